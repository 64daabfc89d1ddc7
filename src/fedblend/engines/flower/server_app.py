"""The fedblend ServerApp: the in-process engine's server loop, with clients on SuperNodes.

Run-config keys (``[tool.flwr.app.config]`` of ``flower_app/pyproject.toml``):

- ``config``: path of a fedblend config (relative paths: from the SuperLink's working dir);
- ``overrides``: ``section.key=value`` items separated by ``;`` (like ``--set``);
- ``out``: the run directory (default ``runs/<name>``), written on the server side;
- ``node-wait-s``: how long to wait for one SuperNode per client;
- ``message-timeout-s``: how long to wait for the replies of one round (``engine.round_timeout``
  of the config, when set, overrides it for training rounds);
- ``resume``: ``true`` continues the unfinished run in ``out`` from its last checkpoint.

A training round leaves out the clients whose reply did not arrive within the timeout or
came back as an error (``metrics.jsonl``: ``dropped`` with the reason) and aggregates the rest.

The server never holds a client's private state: it sends payloads, receives updates whose
roles it checks against ``algorithm.shared_roles`` (a violation fails the run), and at the
end receives only evaluation results. Every received message is described in
``<run dir>/flower/messages.jsonl`` so a run can be audited.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import Algorithm
from fedblend.comm.codec import BASE_DELTA, decode
from fedblend.comm.codec import Message as FbMessage
from fedblend.config import ExperimentConfig, load_config
from fedblend.engines.flower import faults, wire
from fedblend.errors import ConfigError, FedblendError
from fedblend.modalities import modality_for
from fedblend.modality import Modality
from fedblend.rounds import Transport, run_round_loop, with_client_seconds
from fedblend.store.rundir import RunDir

app = ServerApp()


@dataclass
class Settings:
    config: str
    overrides: list[str]
    out: str
    node_wait_s: float = 300.0
    message_timeout_s: float = 3600.0
    resume: bool = False

    @classmethod
    def from_run_config(cls, rc: Any) -> Settings:
        if not rc.get("config"):
            raise ConfigError("run-config: 'config' (path of a fedblend config) is required")
        overrides = [s.strip() for s in str(rc.get("overrides", "")).split(";") if s.strip()]
        return cls(
            config=str(rc["config"]), overrides=overrides, out=str(rc.get("out", "")),
            node_wait_s=float(rc.get("node-wait-s", 300)),
            message_timeout_s=float(rc.get("message-timeout-s", 3600)),
            resume=str(rc.get("resume", False)).lower() in ("true", "1", "yes"),
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_run_config(context.run_config)
    cfg = load_config(settings.config, settings.overrides)
    run = RunDir(settings.out or Path("runs") / cfg.name)
    start_round = run.start(cfg.to_dict(), resume=settings.resume)
    if run.note:  # resume with nothing to resume: the run starts over (in the ServerApp's log)
        print(run.note, flush=True)
    try:
        serve(grid, cfg, run, settings, context.run_id, start_round)
    except BaseException as e:
        run.fail(e)
        raise


@dataclass
class FlowerClients:
    """The server's view of the federation: which node is which client, and its replies."""

    grid: Grid
    cfg: ExperimentConfig
    algorithm: Algorithm
    transport: Transport
    run: RunDir
    timeout_s: float
    run_key: str = ""  # names each node's state dir; the first ServerApp's Flower run id
    nodes: dict[int, int] = field(default_factory=dict)  # cid -> Flower node id
    info: dict[int, dict[str, Any]] = field(default_factory=dict)  # cid -> query reply
    describe: dict[str, Any] = field(default_factory=dict)  # the federation's facts (one copy)
    messages: list[dict[str, Any]] = field(default_factory=list)  # per reply: type, cid, timings
    unavailable: set[int] = field(default_factory=set)  # clients whose node the SuperLink reports dead

    @property
    def config_json(self) -> str:
        raw = self.cfg.to_dict()
        data_dir = Path(self.cfg.data.dir).expanduser()
        if self.cfg.data.kind != "synthetic" and data_dir.is_dir():
            raw["data"]["dir"] = str(data_dir.resolve())  # nodes may run elsewhere on this host
        return json.dumps(raw)

    def _send(self, kind: str, group: str, fields_by_cid: dict[int, dict[str, Any]],
              timeout: float | None = None, tolerate: bool = False) -> tuple[dict[int, Message], dict[int, str]]:
        """Send and wait up to ``timeout`` s; returns (replies, dropped: cid -> reason). Without
        ``tolerate`` an error reply or a missing one fails the run."""
        cfg_json = self.config_json
        timeout = timeout or self.timeout_s
        out = [
            Message(wire.content({wire.CONFIG: cfg_json, wire.RUN_KEY: self.run_key, wire.CID: cid, **f}),
                    dst_node_id=self.nodes[cid], message_type=kind, group_id=group)
            for cid, f in fields_by_cid.items()
        ]
        replies = list(self.grid.send_and_receive(out, timeout=timeout))
        by_node = {v: k for k, v in self.nodes.items()}
        # pushing sets each message's id; the SuperLink's own error reply for a dead node
        # comes from the SuperLink (its node id), so only reply_to names the client
        by_id = {m.metadata.message_id: cid for m, cid in zip(out, fields_by_cid, strict=True)}
        got: dict[int, Message] = {}
        dropped: dict[int, str] = {}
        for r in replies:
            src = r.metadata.src_node_id
            cid = by_node[src] if src in by_node else by_id[r.metadata.reply_to_message_id]
            if r.has_error():
                dropped[cid] = f"error: {r.error.reason}"
                if r.error.code == ErrorCode.NODE_UNAVAILABLE:  # its heartbeat lapsed: dead
                    self.unavailable.add(cid)
                continue
            got[cid] = r
            self.messages.append({"type": kind, "round": group, "cid": cid,
                                  "node_id": r.metadata.src_node_id, **wire.timings(r)})
        for cid in sorted(set(fields_by_cid) - set(got) - set(dropped)):
            dropped[cid] = f"timeout after {timeout:g} s"
        for cid, why in sorted(dropped.items()):
            self.messages.append({"type": kind, "round": group, "cid": cid, "dropped": why})
        if dropped and not tolerate:
            raise FedblendError("; ".join(f"client {c} ({kind}, round {group}): {w}" for c, w in dropped.items()))
        return dict(sorted(got.items())), dropped

    def _inspect(self, kind: str, group: str, cid: int, r: Message, data: bytes | None) -> None:
        rec: dict[str, Any] = {"type": kind, "round": group, "cid": cid, "records": wire.describe(r)}
        if data is not None:
            m = decode(data)
            rec.update(roles=m.roles, tensors=sorted(f"{ro}::{k}" for ro in m.tensors for k in m.tensors[ro]),
                       bytes=len(data))
        with (self.run.path / "flower" / "messages.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def discover(self, wait_s: float) -> None:
        """Ask every SuperNode which client it is until each client has a node."""
        (self.run.path / "flower").mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        expected: int | None = None
        asked: set[int] = set()
        while expected is None or len(self.nodes) < expected:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            asked.update(new)
            cfg_json = self.config_json
            # every new node at once: one query at a time costs a round trip per node, which
            # at a thousand virtual nodes is minutes of waiting. Only one node is asked for the
            # federation's facts (O(clients) each: O(clients^2) bytes if every node sent them)
            msgs = [Message(wire.content({wire.CONFIG: cfg_json, wire.RUN_KEY: self.run_key,
                                          wire.DESCRIBE: int(i == 0 and not self.describe)}),
                            dst_node_id=node_id, message_type=MessageType.QUERY, group_id="setup")
                    for i, node_id in enumerate(new)]
            if msgs:
                for r in sorted(self.grid.send_and_receive(msgs, timeout=self.timeout_s),
                                key=lambda r: r.metadata.src_node_id):
                    if r.has_error():
                        raise FedblendError(f"node {r.metadata.src_node_id} (query): {r.error.reason}")
                    info = json.loads(str(wire.fields(r)[wire.CLIENT]))
                    self._inspect("query", "setup", info["cid"], r, None)
                    if info["cid"] in self.nodes:
                        raise FedblendError(f"two SuperNodes claim client {info['cid']}: check partition-id")
                    self.nodes[info["cid"]] = r.metadata.src_node_id
                    if "describe" in info:  # the federation's facts, from the node asked for them
                        self.describe = info.pop("describe")
                    self.info[info["cid"]] = info
                    expected = info["num_clients"]
            if expected is not None and len(self.nodes) >= expected:
                break
            if time.monotonic() > deadline:
                raise FedblendError(
                    f"{len(self.nodes)} of {expected or '?'} clients have a SuperNode after "
                    f"{wait_s:.0f} s; start one SuperNode per client (partition-id 0..N-1)"
                )
            time.sleep(1.0)

    def train_round(self, rnd: int, payloads: dict[int, FbMessage]) -> tuple[dict[int, FbMessage], dict[int, str]]:
        """One round's updates, and the clients left out (no reply within the round timeout,
        or an error reply) with the reason."""
        every = self.cfg.engine.checkpoint_every
        checkpointed = rnd // every * every if every else rnd  # what a resume would restart from
        sent = {cid: {wire.ROUND: rnd, wire.CHECKPOINTED: checkpointed,
                      wire.PAYLOAD: self.transport.encode_down(rnd, cid, p)}
                for cid, p in payloads.items()}
        replies, dropped = self._send(MessageType.TRAIN, str(rnd), sent,
                                      timeout=self.cfg.engine.round_timeout or None, tolerate=True)
        if payloads and len(dropped) == len(payloads) and all(w.startswith("error") for w in dropped.values()):
            # every client failed the same step: a broken config or code, not a dropout; waiting
            # for more rounds would only repeat it
            raise FedblendError("; ".join(f"client {c} (train, round {rnd}): {w}" for c, w in sorted(dropped.items())))
        faults.maybe_kill_server(rnd)  # test-only; no-op unless its env var is set
        updates = {}
        for cid, r in replies.items():
            data = bytes(wire.fields(r)[wire.UPDATE])  # type: ignore[arg-type]
            self._inspect("train", str(rnd), cid, r, data)
            updates[cid] = with_client_seconds(
                self.transport.decode_up(rnd, cid, data, self.algorithm.shared_roles), wire.timings(r).get("work_s")
            )
        return updates, dropped

    def evaluate(self, final: FbMessage, scored: list[int] | None = None) -> tuple[dict[int, dict[str, str]], dict[str, Any], dict[int, str]]:
        """Each evaluated node's reply (the modality's JSON fields), its local exports, and
        the clients left out: only nodes the SuperLink reports dead (no heartbeat for two
        intervals: killed, machine lost). Any other error, or no reply within
        ``message-timeout-s``, fails the run: a slow evaluation is waited for.

        ``scored``: the evaluation's sample of clients (None: every client). The final payload
        goes to every client, as in the in-process engine (the same bytes down); each finishes
        (FedDPA-F fine-tunes its local adapter), and only the sampled ones are scored."""
        rounds = self.cfg.train.rounds
        scored_set = set(self.nodes if scored is None else scored)
        sent = {cid: {wire.ROUND: rounds, wire.SCORE: int(cid in scored_set),
                      wire.PAYLOAD: self.transport.encode_down(rounds, cid, final)} for cid in sorted(self.nodes)}
        replies: dict[int, dict[str, str]] = {}
        local: dict[str, Any] = {}
        got, dropped = self._send(MessageType.EVALUATE, "final", sent, tolerate=True)
        fatal = {c: w for c, w in dropped.items() if c not in self.unavailable}
        if fatal or not (scored_set & set(got)):
            raise FedblendError("; ".join(f"client {c} (evaluate): {w}" for c, w in sorted(dropped.items()))
                                or "no evaluated client replied")
        for cid, r in got.items():
            self._inspect("evaluate", "final", cid, r, None)
            if cid not in scored_set:
                continue  # finished, not scored
            f = wire.fields(r)
            replies[cid] = {k: str(v) for k, v in f.items() if k != wire.EXPORTS}
            for role, path in json.loads(str(f[wire.EXPORTS])).items():
                local.setdefault(role, {})[str(cid)] = path
        return replies, local, {c: w for c, w in dropped.items() if c in scored_set}


def serve(grid: Grid, cfg: ExperimentConfig, run: RunDir, settings: Settings, run_id: int,
          start_round: int = 0) -> dict[str, Any]:
    from fedblend.rounds import complete_run, resume_checkpoint

    t0 = time.perf_counter()
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.seed)
    mod: Modality = modality_for(cfg)
    cfg = mod.cfg
    algorithm = make_algorithm(cfg)
    if algorithm.pools_data:
        raise ConfigError(f"algorithm: {cfg.algorithm!r} pools all data; run it in-process")
    transport = Transport()
    # resume: the server state of the last checkpoint (client states stay on the nodes, which
    # keep per-round snapshots and train the re-sent round from the matching one)
    if start_round:
        server_state, _, counters = resume_checkpoint(run, transport, [])  # clients: on the nodes
    else:
        server_state, counters = None, {"train_s": 0.0}  # initialised once the trainer is loaded
    counters.setdefault("flower_run_key", str(run_id))  # saved with every checkpoint
    clients = FlowerClients(grid, cfg, algorithm, transport, run, settings.message_timeout_s,
                            run_key=str(counters["flower_run_key"]))
    t = time.perf_counter()
    clients.discover(settings.node_wait_s)
    discover_s = time.perf_counter() - t
    desc = clients.describe  # federation facts, no data
    t = time.perf_counter()
    trainer = mod.load_trainer(desc)  # the server needs adapter shapes and export
    load_s = time.perf_counter() - t
    if server_state is None:
        server_state = algorithm.init_server_state(trainer)
    loop = run_round_loop(algorithm, sorted(clients.nodes), cfg, run, transport, server_state,
                          clients.train_round, start_round=start_round, counters=counters)

    t_eval = time.perf_counter()
    final = algorithm.final_payload(loop.server_state)
    replies, local, eval_dropped = clients.evaluate(final, mod.eval_sample(sorted(clients.nodes)))
    eval_s = time.perf_counter() - t_eval
    ev = mod.collect(replies, desc)
    exported: dict[str, Any] = {"local": local.pop("local", {}), **local} if mod.export_local else {}
    if "global" in final.tensors and "global" in algorithm.eval_adapters_roles():
        trainer.adapters.export("global", final.tensors["global"], run.path / "adapters" / "global")
        exported["global"] = "adapters/global"
    if (delta := algorithm.global_base_delta(loop.server_state)) is not None:  # FLoRA, FedEx-LoRA
        trainer.adapters.export(BASE_DELTA, delta, run.path / "adapters" / BASE_DELTA)
        exported[BASE_DELTA] = f"adapters/{BASE_DELTA}"
    finish = [m.get("finish_s", 0.0) for m in clients.messages if m["type"] == MessageType.EVALUATE]
    prepared = [m["feature_s"] for m in clients.messages if "feature_s" in m]
    times = {"wall_s": time.perf_counter() - t0, "load_s": load_s, "train_s": loop.train_s,
             "finish_s": max(finish, default=0.0), "eval_s": eval_s,
             **({"feature_s": max(prepared)} if prepared else {})}
    comm = {"bytes_up": transport.bytes_up, "bytes_down": transport.bytes_down}
    summary = mod.summarize(run, algorithm, trainer, ev, comm, times, desc, exported,
                            {"resumed_at_round": start_round or None,
                             **({"eval_dropped": {str(c): w for c, w in eval_dropped.items()}}
                                if eval_dropped else {})})
    loads = [m["backbone_load_s"] for m in clients.messages if "backbone_load_s" in m]
    run.write_json("flower/engine.json", {
        "run_id": run_id,
        "nodes": {str(c): n for c, n in sorted(clients.nodes.items())},
        "discover_s": discover_s,  # until every client had a node (its query answered)
        "server_backbone_load_s": load_s,
        "backbone_load_s_per_message": {
            "mean": sum(loads) / len(loads) if loads else None,
            "max": max(loads, default=None), "n": len(loads),
        },
        "messages": clients.messages,
    })
    complete_run(run, summary)
    return summary
