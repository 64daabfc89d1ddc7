"""``fedblend deploy local --gpus 0,1,...``: one GPU per SuperNode via ``CUDA_VISIBLE_DEVICES``.

Node ``i`` sees only GPU ``gpus[i % len(gpus)]`` (round-robin), so on one machine with several
GPUs each client trains on its own; inside the node that GPU is ``cuda:0`` (``model.device``
``auto`` or ``cuda``). The SuperLink, and the ServerApp it starts (which loads the backbone for
adapter shapes and exports), sees only the first listed GPU, so nothing runs on a GPU outside
the list. The list is checked against this machine before anything starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedblend.errors import FedblendError


def parse_gpus(spec: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (one line naming ``--gpus`` when malformed)."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or not all(p.isdigit() for p in parts):
        raise FedblendError(f"--gpus: expected GPU indices like 0,1 (got {spec!r})")
    return [int(p) for p in parts]


def check_gpus(gpus: Sequence[int], available: int | None = None) -> None:
    """Fail unless every index names a CUDA device this machine has (``available``: the count,
    torch's when None)."""
    if available is None:
        from fedblend.device import cuda_count

        available = cuda_count()
    if available == 0:
        raise FedblendError("--gpus: torch sees no CUDA device on this machine; run without --gpus")
    bad = [g for g in gpus if g >= available]
    if bad:
        raise FedblendError(f"--gpus: GPU {bad[0]} does not exist; this machine has {available} "
                            f"(0..{available - 1})")


def gpu_env(gpus: Sequence[int], node: int | None) -> dict[str, str]:
    """The environment that pins SuperNode ``node`` to one GPU, or with ``node=None`` the
    SuperLink and its ServerApp to the first one (empty without ``gpus``)."""
    if not gpus:
        return {}
    return {"CUDA_VISIBLE_DEVICES": str(gpus[0 if node is None else node % len(gpus)])}
