"""Image federations: seeded partitioners, CIFAR-LT counts, domain shift."""

from __future__ import annotations

from collections import Counter

import pytest

from fedblend.config import config_from_dict
from fedblend.partition import partition_by_label
from fedblend.vision.federation import build_image_federation, long_tail_counts, make_long_tail
from fedblend.vision.images import ImageExample


def _pool(n_per_class=40, classes=5):
    return [ImageExample(f"{c}-{i}".encode(), c) for c in range(classes) for i in range(n_per_class)]


def test_partitioners_take_image_examples_with_integer_labels():
    """The seeded flwr-datasets partitioners are tested in tests/test_data.py; here only that
    image examples (integer labels) go through them whole."""
    pool = _pool()
    for kind in ("dirichlet", "pathological", "iid"):
        parts = partition_by_label(pool, 4, kind, seed=1, alpha=0.3, classes=2)
        assert sorted(i for p in parts for i in p) == list(range(len(pool)))


def test_long_tail_counts_follow_the_formula():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [int(5000 * 100 ** (-c / 9)) for c in range(10)]
    assert counts[0] == 5000 and counts[-1] == 50
    pool = _pool(n_per_class=100, classes=10)
    lt = make_long_tail(pool, 10, 10, 100)
    got = Counter(e.label for e in lt)
    assert [got[c] for c in range(10)] == [int(100 * 10 ** (-c / 9)) for c in range(10)]


def _cfg(**vision):
    v = {"dataset": "synthetic", "class_names": ["a", "b", "c", "d"], "synthetic_per_class": 20,
         "own_test_size": 8}
    v.update(vision)
    return config_from_dict({"algorithm": "fedclip", "vision": v, "seed": 5,
                             "data": {"num_clients": 4, "partitioner": "iid"}})


def test_federation_long_tail_and_groups():
    fed = build_image_federation(_cfg(imbalance_factor=10))
    assert fed.train_counts == long_tail_counts(20, 4, 10)
    assert sum(len(c.train) for c in fed.clients) == sum(fed.train_counts)
    g = fed.class_groups()
    assert g["head"] == [0] and g["tail"] == [3]
    assert len(fed.global_test) == 4 * 10  # balanced: every class in full


def test_domain_federation_holds_out_the_unseen_domain():
    fed = build_image_federation(_cfg(federation="domain", domains=["none", "blur", "noise", "rotation"],
                                      unseen_domain="rotation"))
    domains = [c.domain for c in fed.clients]
    assert "rotation" not in domains
    assert domains == ["none", "blur", "noise", "none"]
    assert all(e.domain == "rotation" for e in fed.unseen_test)
    assert all(e.domain == c.domain for c in fed.clients for e in c.train + c.test)
    assert len(fed.unseen_test) == len(fed.global_test)


def test_corruptions_are_deterministic():
    from fedblend.vision.images import preprocess, synthetic_images

    ex = synthetic_images(2, 1, seed=0)[0]
    for d in ("blur", "noise", "contrast", "grayscale", "rotation"):
        a = preprocess(ex.with_domain(d), 32, [0.5] * 3, [0.5] * 3)
        b = preprocess(ex.with_domain(d), 32, [0.5] * 3, [0.5] * 3)
        clean = preprocess(ex, 32, [0.5] * 3, [0.5] * 3)
        assert _eq(a, b) and not _eq(a, clean), d


def _eq(a, b):
    import torch

    return torch.equal(a, b)


def test_bad_parquet_is_a_data_error_naming_the_file(tmp_path):
    from fedblend.errors import DataError

    (tmp_path / "train.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "test.parquet").write_bytes(b"not a parquet file")
    cfg = config_from_dict({"algorithm": "fedclip", "vision": {"dir": str(tmp_path)}})
    with pytest.raises(DataError, match="train.parquet"):
        build_image_federation(cfg)


def test_missing_image_dir_is_a_config_error(tmp_path):
    from fedblend.errors import ConfigError

    cfg = config_from_dict({"algorithm": "fedclip", "vision": {"dir": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="vision.dir"):
        build_image_federation(cfg)
