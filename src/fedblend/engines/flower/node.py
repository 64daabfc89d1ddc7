"""What a SuperNode knows: its partition, its client's data, its private state on disk
(and, for vision, its own frozen-feature cache under ``<state-dir>/feature_cache``).

A :class:`Node` is rebuilt per message from the config the server sends: the federation is
rebuilt deterministically and the node keeps only its own client's data. The client's private
state lives in ``context.state`` (per run, per node) and in
``<state-dir>/run-<key>/client_<cid>.safetensors`` (plus per-round snapshots) so that a
SuperNode restart does not lose it; ``<key>`` is the Flower run id of the run's first
ServerApp, so a resumed ServerApp finds the same state. Neither copy is ever sent.

Deployment engine: every message starts a fresh ClientApp process. Simulation runtime: a few
long-lived worker processes (Ray actors) handle the messages of many virtual nodes, one at a
time, so a worker keeps the federation and the frozen backbone it last built (``_WORKER``,
keyed by the config the server sent) instead of rebuilding them per message. Virtual nodes
have no ``state-dir``: they share ``$FEDBLEND_NODE_DIR``, where state files are named by
client (one client per partition id). There, ``FEDBLEND_NODE_CONTEXT_STATE=0`` keeps the
state on disk only: the simulation runtime holds every virtual node's ``context.state`` in
the driver process and ships it with each message, which at thousands of clients would hold
every client's state in memory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import Algorithm, State
from fedblend.comm.codec import Message, decode, encode
from fedblend.config import ExperimentConfig, config_from_dict
from fedblend.engines.flower import wire
from fedblend.errors import ConfigError
from fedblend.modalities import modality_for
from fedblend.modality import Modality, Prepared
from fedblend.store.files import load_state, save_state

STATE_RECORD = "fedblend.client_state"  # key in context.state (stays on the node)
CONTEXT_STATE_ENV = "FEDBLEND_NODE_CONTEXT_STATE"  # "0": private state on disk only (simulation)

# What this worker process built last: {"key": config JSON, "fed": federation, "trainer": ...}.
# One entry: a worker serves one run at a time, and a new config replaces the old objects.
_WORKER: dict[str, Any] = {}


def _keep_in_context() -> bool:
    return os.environ.get(CONTEXT_STATE_ENV, "1") != "0"


def default_state_root() -> Path:
    from fedblend.text.backbone import cache_dir

    return cache_dir() / "flower-nodes"


@dataclass
class Node:
    cfg: ExperimentConfig
    algorithm: Algorithm
    modality: Modality
    fed: Any  # the whole federation, rebuilt deterministically; the node uses only its client
    client: Any
    run_dir: Path  # node-local: <state-dir>/run-<run_id>
    timings: dict[str, float] = field(default_factory=dict)
    cache_key: str = ""  # the config this node was built from (the worker cache's key)

    @property
    def cid(self) -> int:
        return self.client.cid

    @property
    def state_path(self) -> Path:
        return self.run_dir / f"client_{self.cid}.safetensors"

    # ---- backbone -------------------------------------------------------------------------
    def load_trainer(self) -> Any:
        """The modality's frozen backbone (memory-mapped safetensors for real models) and
        trainer; loaded once per worker process and config (``backbone_cached``: 1 when this
        message reused the worker's)."""
        cached = _WORKER.get("trainer") if _WORKER.get("key") == self.cache_key else None
        t = time.perf_counter()
        trainer = cached if cached is not None else self.modality.load_trainer(self.modality.describe(self.fed))
        if cached is None and self.cache_key and _WORKER.get("key") == self.cache_key:
            _WORKER["trainer"] = trainer
        self.timings["backbone_load_s"] = time.perf_counter() - t
        self.timings["backbone_cached"] = float(cached is not None)
        self.timings["torch_threads"] = torch.get_num_threads()
        return trainer

    def prepare(self, trainer: Any, evaluation: bool = False) -> Prepared:
        """This client's training inputs (vision: frozen features from the node's own cache),
        and its test inputs when ``evaluation``."""
        t = time.perf_counter()
        prep = self.modality.prepare(trainer, self.fed, self.algorithm, None, cids=[self.cid],
                                     evaluation=evaluation)
        self.timings["prepare_s"] = time.perf_counter() - t
        self.timings.update(prep.times)  # e.g. vision's feature_s
        return prep

    # ---- private state ----------------------------------------------------------------------
    # Besides the latest state (``client_<cid>.safetensors``) the node keeps per-round snapshots,
    # ``snapshots/client_<cid>.r<k>.safetensors`` = the state after k rounds, but only the two a
    # run can still need: the newest one at or before the server's last checkpoint (a resumed
    # ServerApp re-sends round r, and the node must train it from its state after r rounds even
    # if it had already trained round r: the server died before aggregating it), and the one
    # just written (what the next round, or the server's next checkpoint, starts from). So the
    # node's disk stays at two snapshots however long the run and however far apart the
    # server's checkpoints.
    def snapshot_path(self, rounds_completed: int) -> Path:
        return self.run_dir / "snapshots" / f"client_{self.cid}.r{rounds_completed}.safetensors"

    def snapshots(self) -> dict[int, Path]:
        """rounds completed -> snapshot file."""
        pre = f"client_{self.cid}.r"
        return {int(p.name[len(pre):].split(".")[0]): p
                for p in (self.run_dir / "snapshots").glob(f"{pre}*.safetensors")}

    def load_state(self, context: Context, trainer: Any, upto: int) -> tuple[State, str, int]:
        """This client's state after at most ``upto`` rounds, where it came from (``context``,
        ``disk`` or ``init``) and the rounds it reflects."""
        rec = context.state.config_records.get(STATE_RECORD) if _keep_in_context() else None
        in_ctx = None
        if rec is not None and int(rec["cid"]) == self.cid and not rec.get("finished"):  # type: ignore[arg-type]
            in_ctx = int(rec["rounds_completed"])  # type: ignore[arg-type]
        on_disk = max((k for k in self.snapshots() if k <= upto), default=None)
        if in_ctx is not None and in_ctx <= upto and (on_disk is None or in_ctx >= on_disk):
            return decode(bytes(rec["state"])).tensors, "context", in_ctx  # type: ignore[arg-type,index]
        if on_disk is not None:
            return load_state(self.snapshot_path(on_disk)), "disk", on_disk
        return self.algorithm.init_client_state(trainer, self.cid), "init", 0

    def save_state(self, context: Context, state: State, rounds_completed: int,
                   keep_from: int | None = None) -> None:
        """Save after training (``keep_from``: the server's last checkpoint) and delete every
        snapshot no resume can need: those older than the newest at or before ``keep_from``,
        those between it and this one, and those after this one (left by a timeline a
        resumed ServerApp abandoned: training them again must not find the old ones). With
        ``keep_from=None``: the finished state after ``finish_client`` (not a snapshot: a
        resumed evaluation starts from the trained one)."""
        finished = keep_from is None
        if _keep_in_context():
            context.state[STATE_RECORD] = ConfigRecord({
                "cid": self.cid,
                "rounds_completed": rounds_completed,
                "finished": finished,
                "state": encode(Message(tensors=state)),
            })
        meta = {"rounds_completed": str(rounds_completed), "finished": str(finished).lower()}
        save_state(self.state_path, state, meta=meta)
        if keep_from is None:
            return
        save_state(self.snapshot_path(rounds_completed), state, meta=meta)
        snaps = self.snapshots()
        floor = max((k for k in snaps if k <= keep_from), default=None)
        for k, p in snaps.items():
            if k not in (floor, rounds_completed):
                p.unlink(missing_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        """One line per handled message in ``<run dir>/node.jsonl`` (node-local)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "node.jsonl").open("a") as f:
            f.write(json.dumps({"cid": self.cid, **record, **self.timings}) + "\n")


def open_node(msg_fields: Any, context: Context) -> Node:
    """Rebuild the experiment from the config the server sent and pick this node's client."""
    t = time.perf_counter()
    raw = json.loads(str(msg_fields[wire.CONFIG]))
    nc = context.node_config
    if wire.NODE_DATA_DIR in nc:
        raw.setdefault("data", {})["dir"] = str(nc[wire.NODE_DATA_DIR])
    root = Path(str(nc.get(wire.NODE_STATE_DIR) or os.environ.get("FEDBLEND_NODE_DIR") or default_state_root()))
    root = root.expanduser()
    cfg = config_from_dict(raw, source="config from the ServerApp")
    modality = modality_for(cfg)
    cfg = config_from_dict(modality.node_config(raw, root), source="config from the ServerApp")
    modality = modality_for(cfg)
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.seed)
    if wire.NODE_PARTITION not in nc:
        raise ConfigError(f"SuperNode: --node-config needs {wire.NODE_PARTITION}=<index>")
    partition = int(nc[wire.NODE_PARTITION])  # type: ignore[arg-type]
    cache_key = json.dumps(modality.cfg.to_dict(), sort_keys=True, default=str)
    if _WORKER.get("key") == cache_key:
        fed = _WORKER["fed"]
    else:
        _WORKER.clear()  # another run's objects: drop them before building this run's
        fed = modality.build_federation()
        _WORKER.update(key=cache_key, fed=fed)
    if not 0 <= partition < len(fed.clients):
        raise ConfigError(
            f"SuperNode: {wire.NODE_PARTITION}={partition} but the federation has "
            f"{len(fed.clients)} clients (0..{len(fed.clients) - 1})"
        )
    key = str(msg_fields[wire.RUN_KEY]) if wire.RUN_KEY in msg_fields else str(context.run_id)
    if not key.isdigit():  # the server's first Flower run id; it names a directory
        raise ConfigError(f"SuperNode: malformed {wire.RUN_KEY} {key!r} from the ServerApp")
    node = Node(
        cfg=modality.cfg, algorithm=make_algorithm(modality.cfg), modality=modality, fed=fed,
        client=fed.clients[partition],
        run_dir=root / f"run-{key}",  # stays the same when the ServerApp resumes
        cache_key=cache_key,
    )
    node.timings["setup_s"] = time.perf_counter() - t
    return node
