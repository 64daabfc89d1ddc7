"""A user's image data set: ``train.parquet`` / ``test.parquet`` in the Hugging Face hub layout.

Each file has a column ``image`` (a struct {bytes, path}, as ``datasets.Image`` writes it, or
plain binary) and an integer column ``label``. Class names come, in this order, from the
config (``vision.class_names``), from the parquet's Hugging Face ``ClassLabel`` feature (the
``huggingface`` key of the Arrow schema metadata, as ``datasets`` writes it), from a preset
(``vision.dataset = "cifar10"``), else ``"class k"``. Every problem is one line naming the
file (and the row where there is one).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fedblend.errors import DataError
from fedblend.vision.images import ImageExample

COLUMNS = ("image", "label")


@dataclass
class ImageTable:
    path: Path
    examples: list[ImageExample]
    class_names: list[str] | None  # from the Hugging Face ClassLabel metadata, when present


def classlabel_names(metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """``ClassLabel`` names of the ``label`` column from Arrow schema metadata, or None."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    label = features.get("label") if isinstance(features, dict) else None
    if isinstance(label, dict) and label.get("_type") == "ClassLabel" and label.get("names"):
        return [str(n) for n in label["names"]]
    return None


def _image_bytes(img: object, root: Path, where: str) -> bytes:
    """The encoded image of one row: its bytes, else the file its ``path`` names (relative to
    the parquet's directory)."""
    data = img.get("bytes") if isinstance(img, dict) else img
    if data:
        return bytes(data)  # type: ignore[arg-type]
    rel = img.get("path") if isinstance(img, dict) else None
    if rel and (root / rel).is_file():
        return (root / rel).read_bytes()
    raise DataError(f"{where}: no image bytes" + (f" and no file {root / rel}" if rel else ""))


def read_image_table(path: Path) -> ImageTable:
    """Read and check one image parquet file: columns, label type, decodable image headers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: image parquet file not found")
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(need image {{bytes, path}} and label; found {', '.join(schema.names)})")
    if not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"{path}: column label must hold integer class ids, found {schema.field('label').type}")
    table = pq.read_table(path, columns=list(COLUMNS))
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    out = []
    for i, (img, y) in enumerate(zip(table.column("image").to_pylist(),
                                     table.column("label").to_pylist(), strict=True)):
        where = f"{path} row {i}"
        if y is None:
            raise DataError(f"{where}: no label")
        data = _image_bytes(img, path.parent, where)
        try:  # header only (cheap); a truncated body fails at decode time, naming the row too
            Image.open(io.BytesIO(data))
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: corrupt image bytes: {e}") from None
        out.append(ImageExample(data, int(y), source=where))
    return ImageTable(path, out, classlabel_names(schema.metadata))


def resolve_classes(train: ImageTable, test: ImageTable, configured: list[str],
                    preset: list[str] | None) -> list[str]:
    """Class names (config > ClassLabel > preset > "class k"), then check every label id is
    inside the class list and every class has test images."""
    if configured:
        names, origin = list(configured), f"vision.class_names has {len(configured)} names"
    elif train.class_names or test.class_names:
        names = train.class_names or test.class_names or []
        origin = f"the parquet's ClassLabel has {len(names)} names"
    elif preset:
        names, origin = list(preset), f"the dataset preset has {len(preset)} classes"
    else:
        n = 1 + max(e.label for t in (train, test) for e in t.examples)
        names, origin = [f"class {k}" for k in range(n)], f"{n} classes"
    for t in (train, test):
        for i, e in enumerate(t.examples):
            if not 0 <= e.label < len(names):
                raise DataError(f"{t.path} row {i}: label {e.label} is outside the class list "
                                f"(ids 0..{len(names) - 1}; {origin})")
    have = {e.label for e in test.examples}
    absent = [k for k in range(len(names)) if k not in have]
    if absent:
        shown = ", ".join(f"{k} ({names[k]!r})" for k in absent[:5])
        raise DataError(f"{test.path}: class(es) {shown} have no test images; every class "
                        f"needs some (the global test set is scored per class)")
    return names
