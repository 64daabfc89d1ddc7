"""A user's own image parquet data set: class names (config > ClassLabel > preset > "class k"),
grayscale / palette images, and one-line errors naming the file and row for bad data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fedblend.config import config_from_dict
from fedblend.errors import DataError
from fedblend.vision.federation import build_image_federation, load_pool
from fedblend.vision.images import ImageExample, load_image, to_rgb

NAMES = ["circle", "square", "stripes"]


def _gray(c: int, i: int, size: int = 32) -> bytes:
    """A grayscale ('L') image whose pattern depends on the class."""
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = [(xx - 16) ** 2 + (yy - 16) ** 2 < 100, (abs(xx - 16) < 9) & (abs(yy - 16) < 9), (xx // 4) % 2 == 0][c]
    noise = np.random.default_rng(100 * c + i).normal(0, 12, (size, size))
    a = np.clip(40 + 170 * pattern + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def _palette(c: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_gray(c, 99))).convert("P").save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def _rows(per_class: int, classes: int = 3) -> tuple[list[bytes], list[int]]:
    return [_gray(c, i) for c in range(classes) for i in range(per_class)], \
        [c for c in range(classes) for _ in range(per_class)]


def _write(path, images, labels, names=None, label_col="label"):
    """pyarrow writer for malformed files (``datasets`` refuses some of them on purpose); the
    ClassLabel metadata has the layout ``datasets`` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"image": [{"bytes": b, "path": None} for b in images], label_col: labels}
    table = pa.table(cols)
    if names is not None:
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, path)


def _cfg(root, **vision):
    v = {"dataset": "parquet", "dir": str(root), "backbone": "tiny_clip", "image_size": 32,
         "own_test_size": 3, "test_per_class": 0}
    v.update(vision)
    return config_from_dict({"algorithm": "fedclip", "seed": 0, "vision": v,
                             "data": {"num_clients": 2, "partitioner": "iid"},
                             "train": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
                             "engine": {"progress": False}})


def test_grayscale_classlabel_parquet_trains_fedclip_end_to_end(tmp_path, tiny_clip_dir):
    """Built with Hugging Face ``datasets`` (ClassLabel feature), grayscale + one palette image:
    the class names come from the metadata and reach the text head and the summary."""
    import datasets
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    from fedblend.runner import run_experiment

    datasets.disable_progress_bars()
    root = tmp_path / "shapes"
    root.mkdir()
    features = Features({"image": HFImage(), "label": ClassLabel(names=NAMES)})
    for split, per_class in (("train", 8), ("test", 4)):
        images, labels = _rows(per_class)
        if split == "train":
            images[0] = _palette(0)
        Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                          features=features).to_parquet(str(root / f"{split}.parquet"))
    s = run_experiment(_cfg(root, cache_dir=str(tmp_path / "cache"), path=str(tiny_clip_dir)), tmp_path / "run")
    assert s["class_names"] == NAMES
    assert s["data"]["train_class_counts"] == [8, 8, 8] and s["data"]["global_test"] == 12
    assert 0.0 <= s["accuracy"]["overall"] <= 1.0
    ref = s["accuracy"]["reference"]
    assert set(ref["groups"]) == {"linear_probe", "centralized_adapter"}
    assert ref["train_examples"] == 24
    # the shapes are easy on raw pixels-through-a-random-tower features: a probe beats chance
    assert ref["linear_probe"] > 1 / 3


def test_class_names_fall_back_from_config_to_classlabel_to_class_k(tmp_path):
    images, labels = _rows(2)
    for split in ("train", "test"):
        _write(tmp_path / f"{split}.parquet", images, labels, names=NAMES)
    assert load_pool(_cfg(tmp_path))[0] == NAMES
    assert load_pool(_cfg(tmp_path, class_names=["a", "b", "c"]))[0] == ["a", "b", "c"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("train", "test"):
        _write(plain / f"{split}.parquet", images, labels)
    assert load_pool(_cfg(plain))[0] == ["class 0", "class 1", "class 2"]
    fed = build_image_federation(_cfg(plain))
    assert len(fed.global_test) == 6 and fed.train_counts == [2, 2, 2]


def test_grayscale_palette_and_16_bit_images_become_rgb():
    for img in (Image.new("L", (5, 4), 7), Image.new("P", (5, 4)), Image.new("I;16", (5, 4), 300),
                Image.new("LA", (5, 4)), Image.new("RGBA", (5, 4))):
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (5, 4), img.mode
    buf = io.BytesIO()
    Image.new("L", (6, 6), 200).save(buf, format="PNG")
    assert np.asarray(load_image(ImageExample(buf.getvalue(), 0))).shape == (6, 6, 3)


def _bad_label(d):
    images, labels = _rows(2)
    _write(d / "train.parquet", images, labels[:-1] + [5], names=NAMES)
    _write(d / "test.parquet", images, labels, names=NAMES)


def _names_too_few(d):
    images, labels = _rows(2)
    for split in ("train", "test"):
        _write(d / f"{split}.parquet", images, labels)


def _test_lacks_class(d):
    images, labels = _rows(2)
    _write(d / "train.parquet", images, labels, names=NAMES)
    _write(d / "test.parquet", images[:4], labels[:4], names=NAMES)


def _corrupt(d):
    images, labels = _rows(2)
    images[3] = b"\x89PNG this is not an image"
    _write(d / "train.parquet", images, labels)
    _write(d / "test.parquet", *_rows(2))


def _no_label_column(d):
    images, labels = _rows(2)
    _write(d / "train.parquet", images, labels, label_col="target")
    _write(d / "test.parquet", images, labels)


def _string_labels(d):
    images, labels = _rows(2)
    _write(d / "train.parquet", images, [NAMES[y] for y in labels])
    _write(d / "test.parquet", images, labels)


def _no_test_file(d):
    _write(d / "train.parquet", *_rows(2))


def _no_bytes(d):
    images, labels = _rows(2)
    images[2] = b""
    _write(d / "train.parquet", images, labels)
    _write(d / "test.parquet", images, labels)


BAD = [
    (_bad_label, {}, r"train\.parquet row 5: label 5 is outside the class list \(ids 0\.\.2; the parquet's ClassLabel"),
    (_names_too_few, {"class_names": ["a", "b"]}, r"row 4: label 2 is outside .*vision\.class_names has 2 names"),
    (_test_lacks_class, {}, r"test\.parquet: class\(es\) 2 \('stripes'\) have no test images"),
    (_corrupt, {}, r"train\.parquet row 3: corrupt image bytes"),
    (_no_label_column, {}, r"train\.parquet: missing column\(s\) label"),
    (_string_labels, {}, r"train\.parquet: column label must hold integer class ids"),
    (_no_test_file, {}, r"test\.parquet: image parquet file not found"),
    (_no_bytes, {}, r"train\.parquet row 2: no image bytes"),
]


@pytest.mark.parametrize(("make", "vision", "message"), BAD, ids=[b[0].__name__.strip("_") for b in BAD])
def test_bad_image_data_is_one_line_naming_file_and_row(tmp_path, make, vision, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        load_pool(_cfg(tmp_path, **vision))
    assert "\n" not in str(e.value)


def test_truncated_image_fails_at_decode_naming_the_row(tmp_path):
    images, labels = _rows(2)
    images[1] = images[1][:60]  # a valid PNG header, the body cut off
    _write(tmp_path / "train.parquet", images, labels)
    _write(tmp_path / "test.parquet", *_rows(2))
    _, train, _ = load_pool(_cfg(tmp_path))
    with pytest.raises(DataError, match=r"train\.parquet row 1: corrupt image bytes, cannot decode"):
        load_image(train[1])
