"""Partitioning one pool of labelled items over clients with flwr-datasets' partitioners
(IID, Dirichlet(alpha), pathological): shared by the text and vision federations."""

from __future__ import annotations

from fedblend.errors import ConfigError


def partition_by_label(
    examples: list, num_clients: int, kind: str, seed: int, alpha: float, classes: int,
    min_size: int = 0,
) -> list[list[int]]:
    """Indices of each client's examples, from a flwr-datasets partitioner (any items with a
    ``label``). ``min_size``: Dirichlet redraws until every partition has that many."""
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    ds = Dataset.from_dict({"label": [e.label for e in examples], "idx": list(range(len(examples)))})
    if kind == "iid":
        ds = ds.shuffle(seed=seed)
        part = IidPartitioner(num_partitions=num_clients)
    elif kind == "dirichlet":
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
