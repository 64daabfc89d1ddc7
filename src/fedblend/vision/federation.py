"""Image federations: label skew (flwr-datasets partitioners), global long tail, domain shift.

- Long tail (CIFAR-10-LT construction): class ``c`` keeps ``n_max * IF**(-c/(C-1))`` training
  examples (the first ones in file order), before partitioning.
- ``label_skew``: the pool is split by ``data.partitioner`` (iid / dirichlet / pathological).
- ``domain``: the pool is split the same way and client k sees the k-th training domain (a
  deterministic corruption); ``vision.unseen_domain`` is held out of training and only tested.
Each client's own test split follows its training label distribution (and domain); the
global test set is class-balanced and clean. Every random choice is seeded by ``cfg.seed``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedblend.config import ExperimentConfig
from fedblend.errors import ConfigError, DataError
from fedblend.partition import partition_by_label
from fedblend.vision.images import CIFAR10_CLASSES, ImageExample, synthetic_images
from fedblend.vision.parquet import read_image_table, resolve_classes


@dataclass
class ImageClient:
    cid: int
    domain: str
    train: list[ImageExample]
    test: list[ImageExample]


@dataclass
class ImageFederation:
    class_names: list[str]
    clients: list[ImageClient]
    global_test: list[ImageExample]
    unseen_test: list[ImageExample] = field(default_factory=list)
    train_counts: list[int] = field(default_factory=list)  # global, per class

    def class_groups(self) -> dict[str, list[int]]:
        """head / medium / tail classes by global training frequency (top 30%, bottom 30%)."""
        order = sorted(range(len(self.train_counts)), key=lambda c: (-self.train_counts[c], c))
        k = max(1, round(0.3 * len(order)))
        return {"head": order[:k], "medium": order[k:-k], "tail": order[-k:]}


def long_tail_counts(n_max: int, n_classes: int, imbalance: float) -> list[int]:
    """CIFAR-LT sizes: ``n_max * IF**(-c/(C-1))``, rounded down, at least 1."""
    if n_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (-c / (n_classes - 1)))) for c in range(n_classes)]


def make_long_tail(pool: list[ImageExample], n_classes: int, imbalance: float, n_max: int) -> list[ImageExample]:
    by_class: dict[int, list[ImageExample]] = {c: [] for c in range(n_classes)}
    for e in pool:
        by_class.setdefault(e.label, []).append(e)
    top = n_max or max(len(v) for v in by_class.values())
    counts = long_tail_counts(top, n_classes, imbalance)
    for c, n in enumerate(counts):
        if len(by_class[c]) < n:
            raise DataError(f"class {c}: {len(by_class[c])} training images, the long tail needs {n}")
    return [e for c in range(n_classes) for e in by_class[c][: counts[c]]]


def _by_label(examples: list[ImageExample]) -> dict[int, list[ImageExample]]:
    out: dict[int, list[ImageExample]] = {}
    for e in examples:
        out.setdefault(e.label, []).append(e)
    return out


def _balanced(test: list[ImageExample], per_class: int, seed: str) -> list[ImageExample]:
    rng = random.Random(seed)
    out = []
    for _, items in sorted(_by_label(test).items()):
        out += items if not per_class or len(items) <= per_class else rng.sample(items, per_class)
    return out


def _own_test(train: list[ImageExample], test_by: dict[int, list[ImageExample]], n: int, seed: str):
    counts = Counter(e.label for e in train)
    rng = random.Random(seed)
    own: list[ImageExample] = []
    for label, c in counts.most_common():
        share = max(1, round(n * c / len(train)))
        cands = test_by.get(label, [])
        own += rng.sample(cands, min(share, len(cands)))
    return own


def load_pool(cfg: ExperimentConfig) -> tuple[list[str], list[ImageExample], list[ImageExample]]:
    v = cfg.vision
    if v.dataset == "synthetic":
        n = len(v.class_names) or 4
        names = v.class_names or [f"class {c}" for c in range(n)]
        train = synthetic_images(n, v.synthetic_per_class, cfg.seed, size=32)
        test = synthetic_images(n, max(2, v.synthetic_per_class // 2), cfg.seed + 1, size=32)
        return names, train, test
    root = Path(v.dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"vision.dir: directory not found: {v.dir}")
    train = read_image_table(root / "train.parquet")
    test = read_image_table(root / "test.parquet")
    preset = CIFAR10_CLASSES if v.dataset == "cifar10" else None
    names = resolve_classes(train, test, v.class_names, preset)
    return names, train.examples, test.examples


def build_image_federation(cfg: ExperimentConfig) -> ImageFederation:
    v, d = cfg.vision, cfg.data
    names, pool, test = load_pool(cfg)
    n_classes = len(names)
    if v.imbalance_factor > 1 or v.n_max:
        pool = make_long_tail(pool, n_classes, v.imbalance_factor, v.n_max)
    try:
        parts = partition_by_label(
            pool, d.num_clients, d.partitioner, cfg.seed, d.dirichlet_alpha, d.classes_per_client,
            min_size=2 if d.partitioner == "dirichlet" else 0,
        )
    except ValueError as e:
        raise DataError(f"{v.dir}: cannot partition {len(pool)} images into {d.num_clients} clients: {e}") from None
    train_domains = ["none"]
    if v.federation == "domain":
        train_domains = [x for x in v.domains if x != v.unseen_domain]
    test_by = _by_label(test)
    clients = []
    for cid, idx in enumerate(parts):
        if not idx:
            raise DataError(f"partition {cid} is empty; use fewer clients or a larger alpha")
        dom = train_domains[cid % len(train_domains)]
        train = [pool[i].with_domain(dom) for i in idx]
        rng = random.Random(f"train:{cfg.seed}:{cid}")
        if d.max_train_per_client and len(train) > d.max_train_per_client:
            train = rng.sample(train, d.max_train_per_client)
        own = _own_test(train, test_by, v.own_test_size, f"test:{cfg.seed}:{cid}")
        clients.append(ImageClient(cid, dom, train, [e.with_domain(dom) for e in own]))
    global_test = _balanced(test, v.test_per_class, f"global:{cfg.seed}")
    unseen = [e.with_domain(v.unseen_domain) for e in global_test] if v.federation == "domain" else []
    counts = Counter(e.label for e in pool)
    fed = ImageFederation(names, clients, global_test, unseen, [counts.get(c, 0) for c in range(n_classes)])
    if d.clients:
        bad = [c for c in d.clients if not 0 <= c < len(fed.clients)]
        if bad:
            raise ConfigError(f"data.clients: unknown client id(s) {bad}")
        fed.clients = [fed.clients[c] for c in d.clients]
    return fed
