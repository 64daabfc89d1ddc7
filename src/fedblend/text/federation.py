"""Build a federation (clients with private train data, per-task test sets) from a config.

Layouts:
- ``file_per_client``: one training file per client (``data.train_pattern``), a shared test
  file whose ``task`` field routes each example to the task it tests (FedDPA's flan8).
- ``task_per_client``: one training file with a ``task`` field; each task becomes a client.
- ``label_skew``: one pool partitioned by label with flwr-datasets partitioners (IID,
  Dirichlet(alpha), pathological); each client's own test set follows its training label
  distribution, and TTP is measured over all clients' test sets.
Every random choice is seeded by ``cfg.seed``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedblend.config import ExperimentConfig, resolve_data_dir
from fedblend.errors import ConfigError, DataError
from fedblend.partition import partition_by_label
from fedblend.text import synthetic
from fedblend.text.sources import Example, read_instructions, read_tsv


@dataclass
class ClientData:
    cid: int
    task: str
    train: list[Example]


@dataclass
class Federation:
    clients: list[ClientData]
    test_by_task: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.test_by_task)

    def client(self, cid: int) -> ClientData:
        for c in self.clients:
            if c.cid == cid:
                return c
        raise KeyError(cid)


def _subsample(items: list[Example], n: int, seed: str) -> list[Example]:
    if n <= 0 or len(items) <= n:
        return list(items)
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in idx]


def _majority_task(examples: list[Example], default: str) -> str:
    tasks = Counter(e.task for e in examples if e.task)
    return tasks.most_common(1)[0][0] if tasks else default


def _group_by_task(examples: list[Example], path: Path | str) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for e in examples:
        if not e.task:
            raise DataError(f"{path}: test records need a 'task' field to be routed to clients")
        groups.setdefault(e.task, []).append(e)
    return groups


def _file_per_client(cfg: ExperimentConfig, root: Path) -> Federation:
    clients = []
    for cid in range(cfg.data.num_clients):
        path = root / cfg.data.train_pattern.format(client=cid)
        train = read_instructions(path)
        clients.append(ClientData(cid, _majority_task(train, f"client{cid}"), train))
    test_path = root / cfg.data.test_file
    test = _group_by_task(read_instructions(test_path), test_path)
    for c in clients:
        if c.task not in test:
            raise DataError(f"{test_path}: no test examples for task '{c.task}' of client {c.cid}")
    return Federation(clients, {c.task: test[c.task] for c in clients})


def _task_per_client(cfg: ExperimentConfig, pool: list[Example], test: list[Example], src) -> Federation:
    by_task = _group_by_task(pool, src)
    test_groups = _group_by_task(test, src)
    tasks = sorted(by_task)[: cfg.data.num_clients]
    clients = [ClientData(i, t, by_task[t]) for i, t in enumerate(tasks)]
    missing = [t for t in tasks if t not in test_groups]
    if missing:
        raise DataError(f"{src}: no test examples for task(s) {', '.join(missing)}")
    return Federation(clients, {t: test_groups[t] for t in tasks})


def _label_skew(cfg: ExperimentConfig, pool: list[Example], test: list[Example]) -> Federation:
    if cfg.data.num_clients > len(pool):
        raise DataError(f"data.num_clients: {cfg.data.num_clients} clients > {len(pool)} training examples "
                        f"in {cfg.data.train_file} (every client needs at least one)")
    parts = partition_by_label(
        pool, cfg.data.num_clients, cfg.data.partitioner, cfg.seed,
        cfg.data.dirichlet_alpha, cfg.data.classes_per_client,
    )
    test_by_label: dict[str, list[Example]] = {}
    for e in test:
        test_by_label.setdefault(e.label, []).append(e)
    clients, tests = [], {}
    n_test = cfg.eval.max_per_task or max(1, len(test) // cfg.data.num_clients)
    for cid, idx in enumerate(parts):
        if not idx:
            raise DataError(f"partition {cid} is empty; use fewer clients or a larger alpha")
        train = [pool[i] for i in idx]
        task = f"client{cid}"
        clients.append(ClientData(cid, task, train))
        # the client's own test set follows its training label distribution
        counts = Counter(e.label for e in train)
        rng = random.Random(f"test:{cfg.seed}:{cid}")
        own: list[Example] = []
        for label, c in counts.most_common():
            share = max(1, round(n_test * c / len(train)))
            cands = test_by_label.get(label, [])
            own += rng.sample(cands, min(share, len(cands)))
        tests[task] = [Example(e.instruction, e.output, task, e.label) for e in own]
    return Federation(clients, tests)


def _split(examples: list[Example], frac: float, seed: int) -> tuple[list[Example], list[Example]]:
    rng = random.Random(f"split:{seed}")
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    n_test = max(1, int(len(idx) * frac))
    test = [examples[i] for i in sorted(idx[:n_test])]
    train = [examples[i] for i in sorted(idx[n_test:])]
    return train, test


def _read_pool(cfg: ExperimentConfig, root: Path, name: str) -> list[Example]:
    path = root / name
    if cfg.data.kind == "tsv":
        return read_tsv(
            path, cfg.data.text_column, cfg.data.label_column, cfg.data.has_header,
            cfg.data.label_names, cfg.data.instruction_template, task=root.name,
        )
    return read_instructions(path)


def build_federation(cfg: ExperimentConfig) -> Federation:
    """The federation described by ``cfg.data`` (seeded, reproducible)."""
    d = cfg.data
    if d.kind == "synthetic":
        tasks = list(synthetic.TASKS)[: d.num_clients]
        if len(tasks) < d.num_clients:
            raise ConfigError(f"data.num_clients: the synthetic source has {len(synthetic.TASKS)} tasks")
        fed = Federation(
            [ClientData(i, t, synthetic.generate(t, d.synthetic_train_per_client, cfg.seed))
             for i, t in enumerate(tasks)],
            {t: synthetic.generate(t, d.synthetic_test_per_task, cfg.seed + 1_000_003) for t in tasks},
        )
    else:
        root = resolve_data_dir(cfg)
        assert root is not None
        if d.layout == "file_per_client":
            if d.kind != "instructions":
                raise ConfigError("data.layout: 'file_per_client' needs data.kind = 'instructions'")
            fed = _file_per_client(cfg, root)
        else:
            pool = _read_pool(cfg, root, d.train_file)
            test_path = root / d.test_file
            test = _read_pool(cfg, root, d.test_file) if test_path.exists() else None
            if test is None:
                pool, test = _split(pool, d.test_fraction, cfg.seed)
            if d.layout == "task_per_client":
                fed = _task_per_client(cfg, pool, test, root / d.train_file)
            else:
                fed = _label_skew(cfg, pool, test)
    if d.clients:
        unknown = [c for c in d.clients if c >= len(fed.clients) or c < 0]
        if unknown:
            raise ConfigError(f"data.clients: unknown client id(s) {unknown}")
        fed.clients = [fed.clients[c] for c in d.clients]
        fed.test_by_task = {c.task: fed.test_by_task[c.task] for c in fed.clients}
    for c in fed.clients:
        c.train = _subsample(c.train, d.max_train_per_client, f"train:{cfg.seed}:{c.cid}")
        if not c.train:
            raise DataError(f"client {c.cid}: no training examples")
    fed.test_by_task = {
        t: _subsample(ex, cfg.eval.max_per_task, f"test:{cfg.seed}:{t}")
        for t, ex in fed.test_by_task.items()
    }
    return fed
