"""Partitioning one pool of labelled items over clients with flwr-datasets' partitioners
(IID, Dirichlet(alpha), pathological): shared by the text and vision federations."""

from __future__ import annotations

import numpy as np

from fedblend.errors import ConfigError


def partition_by_label(
    examples: list, num_clients: int, kind: str, seed: int, alpha: float, classes: int,
    min_size: int = 0,
) -> list[list[int]]:
    """Indices of each client's examples, from a flwr-datasets partitioner (any items with a
    ``label``). ``min_size``: Dirichlet redraws until every partition has that many."""
    if kind == "iid":
        # IidPartitioner over ``Dataset.shuffle(seed)``: partition i is the i-th contiguous
        # shard (``Dataset.shard``) of the rows in the order np.random.default_rng(seed)
        # permutes them, which is what ``shuffle`` draws. Computed directly: one
        # load_partition per client and iterating the shuffled column cost ~25 s at 10,000
        # clients (tests/test_population.py checks it equals flwr-datasets' partitions)
        order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        return contiguous_shards(order, num_clients)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    ds = Dataset.from_dict({"label": [e.label for e in examples], "idx": list(range(len(examples)))})
    if kind == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
        )
    else:
        n_labels = len(set(ds["label"]))
        if classes > n_labels:
            raise ConfigError(f"data.classes_per_client: {classes} > {n_labels} labels in the data")
        part = PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label",
            num_classes_per_partition=classes, class_assignment_mode="first-deterministic",
            shuffle=True, seed=seed,
        )
    part.dataset = ds
    return [list(part.load_partition(i)["idx"]) for i in range(num_clients)]


def contiguous_shards(items: list[int], num_shards: int) -> list[list[int]]:
    """``datasets.Dataset.shard(num_shards, i, contiguous=True)`` for every ``i``: the first
    ``len % num_shards`` shards one longer."""
    div, mod = divmod(len(items), num_shards)
    out = []
    for i in range(num_shards):
        start = div * i + min(i, mod)
        out.append(items[start:start + div + (1 if i < mod else 0)])
    return out
