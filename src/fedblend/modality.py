"""The modality seam: what differs between a text and a vision run, behind one interface.

The runner (:mod:`fedblend.runner`) and the engines drive every experiment through a
:class:`Modality`: build the federation, load the trainer (frozen backbone + trainer), prepare
each client's training data, evaluate each client where its private state is, export the
adapters, fill the modality's summary section. On Flower the same object answers the node's
questions (its client, what to report on ``query``, its evaluation reply) and builds the
server's summary from the nodes' replies.
"""

from __future__ import annotations

import functools
import resource
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedblend.algorithms.base import Algorithm, ClientContext, State
from fedblend.comm.codec import BASE_DELTA, Message
from fedblend.config import ExperimentConfig
from fedblend.store.rundir import RunDir

Advance = Callable[[int], None]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Prepared:
    """Per-client training inputs, as the algorithm hooks see them (``ctx.examples``)."""

    train_data: dict[int, Sequence[Any]]  # what local_update trains on ({0: pooled} if pooled)
    examples: dict[int, Sequence[Any]]  # each client's own training data (finish_client)
    times: dict[str, float] = field(default_factory=dict)  # e.g. feature extraction seconds
    extra: Any = None  # modality-private (vision: the test shards)


@dataclass
class Evaluation:
    """Every client's evaluation result (JSON-able on Flower) plus instance counts."""

    per_client: dict[int, Any]
    times: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Modality(ABC):
    name: str = "?"
    export_local: bool = True  # export each client's private (local) adapters too
    carried_files: tuple[str, ...] = ()  # run-dir files a re-evaluation copies from its source

    def __init__(self, cfg: ExperimentConfig) -> None:
        from fedblend.device import with_resolved_dtype

        # model.dtype = "auto" becomes this host's choice once, here: every backbone, trainer
        # and autocast of the run reads the resolved name (config.json keeps "auto")
        self.cfg = with_resolved_dtype(cfg)

    @functools.cached_property
    def device(self) -> Any:
        """The ``torch.device`` that ``model.device`` names here: resolved once per run, and
        every backbone of the run is placed on it."""
        from fedblend.device import resolve_device

        return resolve_device(self.cfg.model.device)

    # ---- setup ----------------------------------------------------------------------------
    @abstractmethod
    def build_federation(self) -> Any:
        """The federation of ``cfg`` (deterministic: every node rebuilds the same one)."""

    @abstractmethod
    def describe(self, fed: Any) -> dict[str, Any]:
        """JSON-able facts about the federation: ``data`` (the summary's data section) and what
        :meth:`load_trainer` needs (a Flower server has no data, only this)."""

    @abstractmethod
    def load_trainer(self, desc: dict[str, Any]) -> Any:
        """The frozen backbone and a trainer around it."""

    @abstractmethod
    def prepare(self, trainer: Any, fed: Any, algorithm: Algorithm, progress: Any,
                cids: Sequence[int] | None = None, evaluation: bool = True) -> Prepared:
        """Training inputs of clients ``cids`` (all when None), and test inputs when ``evaluation``."""

    def client(self, fed: Any, cid: int) -> Any:
        return next(c for c in fed.clients if c.cid == cid)

    def eval_clients(self, fed: Any) -> list[int]:
        """The clients the evaluation scores (every one; text federations past
        ``eval.exact_max_clients``: a seeded sample). Only their finished states are kept."""
        return [c.cid for c in fed.clients]

    def eval_sample(self, ids: list[int]) -> list[int] | None:
        """:meth:`eval_clients` from the client ids alone (None: every client), for a server
        that holds no data (the Flower ServerApp)."""
        return None

    def track_rounds(self, algorithm: Algorithm, trainer: Any, prep: Prepared, run: RunDir,
                     start_round: int) -> Algorithm:
        """The algorithm the round loop drives (vision wraps it to score every round)."""
        return algorithm

    # ---- evaluation -----------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                 finals: dict[int, Message], states: dict[int, State],
                 contexts: dict[int, ClientContext], progress: Any) -> Evaluation:
        """Every client's model, evaluated where its state is (in-process: here)."""

    @abstractmethod
    def evaluate_on_node(self, algorithm: Algorithm, trainer: Any, fed: Any, prep: Prepared,
                         ctx: ClientContext, final: Message, state: State) -> dict[str, str]:
        """One client's evaluation on its SuperNode: JSON strings only (no tensors)."""

    @abstractmethod
    def collect(self, replies: dict[int, dict[str, str]], desc: dict[str, Any]) -> Evaluation:
        """The server's :class:`Evaluation` from the nodes' :meth:`evaluate_on_node` replies."""

    # ---- outputs --------------------------------------------------------------------------
    def export_adapters(self, algorithm: Algorithm, trainer: Any, run: RunDir,
                        finals: dict[int, Message], states: dict[int, State]) -> dict[str, Any]:
        """``adapters/global``, ``adapters/base_delta`` (FLoRA, FedEx-LoRA) and
        (``export_local``) ``adapters/local/client_<cid>``."""
        out: dict[str, Any] = {"local": {}}
        global_done = False
        for cid, state in states.items():
            adapters = algorithm.eval_adapters(finals[cid], state)
            for role, tensors in adapters.items():
                if role == "global" and not global_done:
                    # as the Flower ServerApp: the final payload's global adapter where it travels
                    # whole (a client may evaluate another, e.g. its own rank's truncation)
                    tensors = finals[cid].tensors.get("global", tensors)
                    trainer.adapters.export("global", tensors, run.path / "adapters" / "global")
                    out["global"] = "adapters/global"
                    global_done = True
                elif role == BASE_DELTA and BASE_DELTA not in out:  # every client's, after the final sync
                    trainer.adapters.export(BASE_DELTA, tensors, run.path / "adapters" / BASE_DELTA)
                    out[BASE_DELTA] = f"adapters/{BASE_DELTA}"
                elif role == "local" and self.export_local:
                    rel = f"adapters/local/client_{cid}"
                    trainer.adapters.export("local", tensors, run.path / rel)
                    out["local"][str(cid)] = rel
        return out

    @abstractmethod
    def summarize(self, run: RunDir, algorithm: Algorithm, trainer: Any, ev: Evaluation,
                  comm: dict[str, int], times: dict[str, Any], desc: dict[str, Any],
                  exported: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """summary.json; also writes the modality's per-instance records under ``run``."""

    # ---- Flower node ----------------------------------------------------------------------
    def node_info(self, fed: Any, client: Any) -> dict[str, Any]:
        """What a SuperNode reports on ``query``."""
        return {"cid": client.cid, "train_examples": len(client.train),
                "num_clients": len(fed.clients), "describe": self.describe(fed)}

    def node_config(self, raw: dict[str, Any], node_root: Path) -> dict[str, Any]:
        """The config as a node runs it (node-local paths)."""
        return raw
