"""The Flower server's side of dropout, against a scripted Grid: a client whose reply is an
error and one whose reply never comes are left out; the round aggregates the one that answered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedblend.algorithms import make_algorithm
from fedblend.comm.codec import Message as FbMessage
from fedblend.comm.codec import encode
from fedblend.config import load_config
from fedblend.engines.flower import wire
from fedblend.engines.flower.server_app import FlowerClients
from fedblend.engines.inprocess import Transport, run_round_loop
from fedblend.errors import FedblendError
from fedblend.store.rundir import RunDir

from .conftest import TINY, TINY_OVERRIDES


class ScriptedGrid:
    """Node 100 (client 0) answers with an update (an evaluation), node 101 (client 1) with an
    error reply, node 102 (client 2) never answers, node 103 (client 3) is dead: the SuperLink
    answers for it with its "node unavailable" error."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        self.sent += messages
        replies = []
        for m in messages:
            if m.metadata.dst_node_id == 100 and m.metadata.message_type == MessageType.EVALUATE:
                replies.append(Message(RecordDict({wire.RECORD: ConfigRecord({wire.EXPORTS: "{}", "eval": "{}"})}),
                                       reply_to=m))
            elif m.metadata.dst_node_id == 100:
                update = FbMessage(tensors={"global": {"w": torch.ones(2, 2)}}, num_examples=3)
                replies.append(Message(RecordDict({wire.RECORD: ConfigRecord({wire.UPDATE: encode(update)})}),
                                       reply_to=m))
            elif m.metadata.dst_node_id == 103:  # what the SuperLink answers for a dead node
                replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"),
                                       reply_to=m))
            elif m.metadata.dst_node_id == 101:
                replies.append(Message(Error(code=0, reason="ClientApp raised"), reply_to=m))
        return replies


@pytest.fixture()
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower stamps every Message with the identity of the running task; set a fake one
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.mark.usefixtures("_task_identity")
def test_error_and_missing_replies_are_dropped_and_the_rest_aggregated(tmp_path: Path) -> None:
    cfg = load_config(TINY, [*TINY_OVERRIDES, "data.num_clients=3", "train.rounds=1",
                             "engine.round_timeout=7", "engine.checkpoint_every=0"])
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict(), resume=False)
    (run.path / "flower").mkdir()
    algorithm, grid, transport = make_algorithm(cfg), ScriptedGrid(), Transport()
    clients = FlowerClients(grid, cfg, algorithm, transport, run, timeout_s=3600, run_key="1",  # type: ignore[arg-type]
                            nodes={0: 100, 1: 101, 2: 102})
    start = {"global": {"w": torch.zeros(2, 2)}}
    loop = run_round_loop(algorithm, [0, 1, 2], cfg, run, transport, start, clients.train_round)

    assert grid.timeouts == [7]  # engine.round_timeout, not the 3600 s message timeout
    (r0,) = run.rounds()
    assert r0["clients"] == [0, 1, 2] and r0["answered"] == [0]
    assert r0["dropped"] == {"1": "error: ClientApp raised", "2": "timeout after 7 s"}
    assert torch.equal(loop.server_state["global"]["w"], torch.ones(2, 2))  # client 0's update alone

    # evaluation still needs every client: a missing reply there fails the run
    with pytest.raises(FedblendError, match="client 2 .*timeout after 3600 s"):
        clients.evaluate(algorithm.final_payload(loop.server_state))


@pytest.mark.usefixtures("_task_identity")
def test_a_round_in_which_every_client_errors_fails_the_run(tmp_path: Path) -> None:
    # a broken config or code fails on every node alike: that is an error, not a dropout
    cfg = load_config(TINY, [*TINY_OVERRIDES, "data.num_clients=1", "train.rounds=3",
                             "engine.checkpoint_every=0"])
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict(), resume=False)
    (run.path / "flower").mkdir()
    algorithm, grid, transport = make_algorithm(cfg), ScriptedGrid(), Transport()
    clients = FlowerClients(grid, cfg, algorithm, transport, run, timeout_s=3600, run_key="1",  # type: ignore[arg-type]
                            nodes={1: 101})  # node 101 always answers with an error
    with pytest.raises(FedblendError, match=r"client 1 \(train, round 0\): error: ClientApp raised"):
        run_round_loop(algorithm, [1], cfg, run, transport, {"global": {"w": torch.zeros(2, 2)}},
                       clients.train_round)
    assert len(grid.timeouts) == 1  # failed in the first round, not after all three


def _final_evaluation(tmp_path: Path) -> tuple[FlowerClients, ScriptedGrid, FbMessage]:
    """The server at its final evaluation: client 0 (node 100) answers, client 3 (node 103) is dead."""
    cfg = load_config(TINY, [*TINY_OVERRIDES, "data.num_clients=2", "train.rounds=1"])
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict(), resume=False)
    (run.path / "flower").mkdir()
    algorithm, grid = make_algorithm(cfg), ScriptedGrid()
    clients = FlowerClients(grid, cfg, algorithm, Transport(), run, timeout_s=3600, run_key="1",  # type: ignore[arg-type]
                            nodes={0: 100, 3: 103})
    return clients, grid, algorithm.final_payload({"global": {"w": torch.zeros(2, 2)}})


@pytest.mark.usefixtures("_task_identity")
def test_evaluation_leaves_out_only_nodes_the_superlink_reports_dead(tmp_path: Path) -> None:
    clients, _, final = _final_evaluation(tmp_path)
    replies, _, dropped = clients.evaluate(final)
    assert list(replies) == [0]
    assert dropped == {3: "error: Node Unavailable"}
    assert {"type": "evaluate", "round": "final", "cid": 3, "dropped": "error: Node Unavailable"} in clients.messages


@pytest.mark.usefixtures("_task_identity")
def test_a_sampled_evaluation_sends_the_final_payload_to_all_and_scores_the_sample(tmp_path: Path) -> None:
    clients, grid, final = _final_evaluation(tmp_path)
    replies, _, dropped = clients.evaluate(final, scored=[0])
    score = {m.metadata.dst_node_id: wire.fields(m)[wire.SCORE] for m in grid.sent}
    assert score == {100: 1, 103: 0}  # every client gets the final payload; only the sample is scored
    assert list(replies) == [0] and dropped == {}  # a dead node outside the sample costs nothing
    with pytest.raises(FedblendError, match="client 3 \\(evaluate\\): error: Node Unavailable"):
        clients.evaluate(final, scored=[3])  # no evaluated client answered


class QueryGrid:
    """Three SuperNodes (ids 200-202, clients 0-2) answering the server's query as the ClientApp
    does: the federation's facts only when asked for them."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [200, 201, 202]

    def send_and_receive(self, messages, *, timeout=None):
        import json

        self.sent += messages
        replies = []
        for m in messages:
            cid = m.metadata.dst_node_id - 200
            info = {"cid": cid, "train_examples": 3, "num_clients": 3, "task": f"t{cid}",
                    "describe": {"data": {"clients": 3, "train_examples": {str(c): 3 for c in range(3)}}}}
            if not wire.fields(m)[wire.DESCRIBE]:
                info.pop("describe")
            replies.append(Message(RecordDict({wire.RECORD: ConfigRecord({wire.CLIENT: json.dumps(info)})}),
                                   reply_to=m))
        return replies


@pytest.mark.usefixtures("_task_identity")
def test_discovery_asks_one_node_for_the_federations_facts(tmp_path: Path) -> None:
    cfg = load_config(TINY, [*TINY_OVERRIDES, "data.num_clients=3", "train.rounds=1"])
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict(), resume=False)
    grid = QueryGrid()
    clients = FlowerClients(grid, cfg, make_algorithm(cfg), Transport(), run, timeout_s=60, run_key="1")  # type: ignore[arg-type]
    clients.discover(wait_s=10)
    assert clients.nodes == {0: 200, 1: 201, 2: 202}
    assert [wire.fields(m)[wire.DESCRIBE] for m in grid.sent] == [1, 0, 0]  # O(clients) facts, once
    assert clients.describe["data"]["clients"] == 3
    assert all("describe" not in i and i["task"] == f"t{c}" for c, i in clients.info.items())
