"""The message contract between the fedblend ServerApp and ClientApp.

Every fedblend :class:`~fedblend.comm.codec.Message` travels as its codec bytes (safetensors
with JSON metadata) in one ``ConfigRecord`` entry, so the byte counts in summary.json are
exactly those of the in-process engine. Everything else a message carries (the experiment
config, client ids, timings, evaluation scores) is plain config/metric values. The names
below are the only record keys either side uses.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

RECORD = "fedblend"  # ConfigRecord: the fedblend fields of a message
TIMINGS = "timings"  # MetricRecord: node-side seconds (backbone load, work)

# keys inside the "fedblend" ConfigRecord
CONFIG = "config"  # server -> node: the experiment config as JSON
CID = "cid"  # server -> node: the fedblend client id the node is asked to act as
ROUND = "round"
PAYLOAD = "payload"  # server -> node: codec bytes of a payload / final payload
UPDATE = "update"  # node -> server: codec bytes of an update
CLIENT = "client"  # node -> server (query): JSON with cid, task, train examples, num clients
DESCRIBE = "describe"  # server -> node (query): 1 = add the federation's facts (O(clients); one copy is enough)
# node -> server (evaluate): the modality's fields (Modality.evaluate_on_node), plus EXPORTS
EVAL = "eval"  # JSON of the client's evaluation (text: scores, weights, predictions; vision: accuracies)
SCORE = "score"  # server -> node (evaluate): 1 finish and evaluate, 0 finish only (not in the evaluation sample)
EXPORTS = "exports"  # node -> server (evaluate): JSON {role: node-local adapter path}
REFERENCES = "references"  # text: JSON {task: [reference outputs]}
CACHE = "cache"  # vision: JSON of the node's feature-cache use
RUN_KEY = "run-key"  # server -> node: names the node's state dir; kept when a run resumes
CHECKPOINTED = "checkpointed"  # server -> node (train): rounds in the server's last checkpoint

# keys the ClientApp reads from the SuperNode's --node-config
NODE_PARTITION = "partition-id"
NODE_STATE_DIR = "state-dir"
NODE_DATA_DIR = "data-dir"


def content(fields: dict[str, Any], timings: dict[str, float] | None = None) -> RecordDict:
    rd = RecordDict({RECORD: ConfigRecord(fields)})
    if timings:
        rd[TIMINGS] = MetricRecord({k: float(v) for k, v in timings.items()})
    return rd


def fields(msg: Message) -> ConfigRecord:
    return msg.content.config_records[RECORD]


def timings(msg: Message) -> dict[str, float]:
    rec = msg.content.metric_records.get(TIMINGS)
    return {k: float(v) for k, v in rec.items()} if rec is not None else {}  # type: ignore[arg-type]


def describe(msg: Message) -> dict[str, Any]:
    """What a received message holds, record by record (for the server's inspection log)."""
    rd = msg.content
    return {
        "arrays": {k: list(r.keys()) for k, r in rd.array_records.items()},
        "configs": {k: sorted(r.keys()) for k, r in rd.config_records.items()},
        "metrics": {k: sorted(r.keys()) for k, r in rd.metric_records.items()},
    }
