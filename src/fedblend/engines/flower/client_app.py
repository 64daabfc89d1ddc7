"""The fedblend ClientApp: a SuperNode acting as one fedblend client.

``query``: report which client this node is (from ``--node-config partition-id``).
``train``: one ``local_update`` on the node's own data; only the update goes back, after
the same shared-roles check the server applies again on receipt.
``evaluate``: ``finish_client`` and evaluation of the client's own (private) model by the
modality (text: P/TTP generations; vision: accuracy on the client's own test split and on the
global test set); only scores, per-instance weights and predictions go back, plus the
node-local paths where its local adapters were exported. A client outside a sampled
evaluation (``score`` 0) only finishes.
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedblend.algorithms.base import ClientContext, client_seed
from fedblend.comm.codec import decode, encode
from fedblend.engines.flower import faults, wire
from fedblend.engines.flower.node import open_node
from fedblend.rounds import check_roles

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    f = wire.fields(msg)
    node = open_node(f, context)
    info = node.modality.node_info(node.fed, node.client)
    if not int(f.get(wire.DESCRIBE, 1)):  # type: ignore[arg-type]  # the server has (or gets) them elsewhere
        info.pop("describe")
    return Message(wire.content({wire.CLIENT: json.dumps(info)}, node.timings), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    f = wire.fields(msg)
    node = open_node(f, context)
    rnd, cid = int(f[wire.ROUND]), int(f[wire.CID])  # type: ignore[arg-type]
    _check_cid(cid, node.cid)
    faults.maybe_kill_node(cid, rnd)  # test-only; a no-op unless its env var is set
    trainer = node.load_trainer()
    prep = node.prepare(trainer)
    state, source, state_round = node.load_state(context, trainer, upto=rnd)
    ctx = ClientContext(
        cid=cid, round=rnd, seed=client_seed(node.cfg.seed, rnd, cid),
        examples=prep.train_data[cid], trainer=trainer, cfg=node.cfg,
    )
    t = time.perf_counter()
    update, state = node.algorithm.local_update(ctx, decode(bytes(f[wire.PAYLOAD])), state)  # type: ignore[arg-type]
    node.timings["work_s"] = time.perf_counter() - t
    check_roles(cid, update, node.algorithm.shared_roles)
    node.save_state(context, state, rnd + 1, keep_from=int(f.get(wire.CHECKPOINTED, 0)))  # type: ignore[arg-type]
    node.log({"type": "train", "round": rnd, "state_from": source, "state_round": state_round,
              "state_roles": sorted(state)})
    return Message(wire.content({wire.UPDATE: encode(update)}, node.timings), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    f = wire.fields(msg)
    node = open_node(f, context)
    cid = int(f[wire.CID])  # type: ignore[arg-type]
    _check_cid(cid, node.cid)
    rounds = node.cfg.train.rounds
    trainer = node.load_trainer()
    scored = bool(int(f.get(wire.SCORE, 1)))  # type: ignore[arg-type]  # else: outside a sampled evaluation
    prep = node.prepare(trainer, evaluation=scored)
    state, source, state_round = node.load_state(context, trainer, upto=rounds)
    final = decode(bytes(f[wire.PAYLOAD]))  # type: ignore[arg-type]
    ctx = ClientContext(
        cid=cid, round=rounds, seed=client_seed(node.cfg.seed, rounds, cid),
        examples=prep.examples[cid], trainer=trainer, cfg=node.cfg,
    )
    t = time.perf_counter()
    state = node.algorithm.finish_client(ctx, final, state)
    node.timings["finish_s"] = time.perf_counter() - t
    node.save_state(context, state, rounds)  # the finished state: not a resumable snapshot
    if not scored:  # finished, not scored
        node.log({"type": "finish", "round": rounds, "state_from": source, "state_round": state_round})
        return Message(wire.content({wire.EXPORTS: "{}"}, node.timings), reply_to=msg)
    t = time.perf_counter()
    reply = node.modality.evaluate_on_node(node.algorithm, trainer, node.fed, prep, ctx, final, state)
    node.timings["eval_s"] = time.perf_counter() - t
    exports = {}
    for role, tensors in node.algorithm.eval_adapters(final, state).items():
        # the server exports the global adapter from the final payload where it travels in
        # one piece; where it is built from private state (FFA-LoRA's A), the node exports it
        from_server = role == "global" and "global" in final.tensors
        peft = role in trainer.adapters.roles  # attached tensors (FedALT's router) stay in the state
        if not from_server and peft and node.modality.export_local:
            path = node.run_dir / "adapters" / role / f"client_{cid}"
            trainer.adapters.export(role, tensors, path)
            exports[role] = str(path)
    node.log({"type": "evaluate", "round": rounds, "state_from": source, "state_round": state_round,
              "exports": exports})
    reply[wire.EXPORTS] = json.dumps(exports)
    return Message(wire.content(reply, node.timings), reply_to=msg)


def _check_cid(asked: int, mine: int) -> None:
    if asked != mine:
        raise RuntimeError(f"the server addressed client {asked} but this node is client {mine}")
