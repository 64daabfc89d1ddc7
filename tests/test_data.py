from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED, shared_flan8, tiny_raw

from fedblend.config import config_from_dict, load_config
from fedblend.errors import DataError
from fedblend.partition import partition_by_label
from fedblend.text import synthetic
from fedblend.text.federation import build_federation
from fedblend.text.sources import Example, read_instructions, read_tsv


def test_read_json_and_jsonl(tmp_path: Path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"instruction": "i", "output": "o", "task": "t"}]))
    b = tmp_path / "b.jsonl"
    b.write_text('{"instruction": "i2", "output": "o2"}\n\n{"instruction": "i3", "output": "o3"}\n')
    assert read_instructions(a) == [Example("i", "o", "t", "o")]
    assert [e.output for e in read_instructions(b)] == ["o2", "o3"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"[]", "no records"),
        (b'[{"instruction": "x"}]', "lacks the field 'output'"),
        (b'[{"instruction": 3, "output": "y"}]', "'instruction' is not a string"),
        (b'{"instruction": "x", "output": "y"}\n{broken\n', "line 2: invalid JSON"),
        (b"\xff\xfe\x00garbage", "cannot read"),
    ],
)
def test_bad_instruction_files(tmp_path: Path, content: bytes, needle: str):
    p = tmp_path / "d.json"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_instructions(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_unreadable_path_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        read_instructions(tmp_path / "missing.json")


def test_file_per_client_routes_test_by_task(flan_like: Path):
    cfg = config_from_dict(tiny_raw(data={"kind": "instructions", "dir": str(flan_like), "num_clients": 3}))
    fed = build_federation(cfg)
    assert [c.task for c in fed.clients] == ["alpha", "beta", "gamma"]
    assert all(len(c.train) == 6 for c in fed.clients)
    assert {t: len(v) for t, v in fed.test_by_task.items()} == {"alpha": 4, "beta": 4, "gamma": 4}
    assert all(e.task == "beta" for e in fed.test_by_task["beta"])


def test_empty_client_file_is_reported(flan_like: Path):
    (flan_like / "local_training_1.json").write_text("")
    cfg = config_from_dict(tiny_raw(data={"kind": "instructions", "dir": str(flan_like), "num_clients": 3}))
    with pytest.raises(DataError, match="local_training_1.json: data file is empty"):
        build_federation(cfg)


def test_subsampling_is_seeded(flan_like: Path):
    raw = tiny_raw(data={"kind": "instructions", "dir": str(flan_like), "num_clients": 3,
                         "max_train_per_client": 3}, eval={"max_per_task": 2})
    a, b = build_federation(config_from_dict(raw)), build_federation(config_from_dict(raw))
    assert [c.train for c in a.clients] == [c.train for c in b.clients]
    assert all(len(c.train) == 3 for c in a.clients)
    assert all(len(v) == 2 for v in a.test_by_task.values())
    c = build_federation(config_from_dict({**raw, "seed": 99}))
    assert [x.train for x in c.clients] != [x.train for x in a.clients]


def _pool(n_per_class: int = 40, classes: int = 5) -> list[Example]:
    return [Example(f"x{i}", f"c{c}", "pool", f"c{c}") for c in range(classes) for i in range(n_per_class)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitioners_reproducible_by_seed(kind: str):
    pool = _pool()
    a = partition_by_label(pool, 4, kind, seed=1, alpha=0.3, classes=2)
    b = partition_by_label(pool, 4, kind, seed=1, alpha=0.3, classes=2)
    c = partition_by_label(pool, 4, kind, seed=2, alpha=0.3, classes=2)
    assert a == b
    assert a != c
    flat = [i for part in a for i in part]
    assert sorted(flat) == list(range(len(pool)))  # disjoint and complete


def test_pathological_gives_k_classes_per_client():
    pool = _pool()
    parts = partition_by_label(pool, 5, "pathological", seed=0, alpha=1.0, classes=2)
    for part in parts:
        assert len({pool[i].label for i in part}) <= 2


def test_dirichlet_is_skewed():
    pool = _pool(100)
    parts = partition_by_label(pool, 4, "dirichlet", seed=0, alpha=0.1, classes=2)
    top_share = [Counter(pool[i].label for i in p).most_common(1)[0][1] / len(p) for p in parts if p]
    assert max(top_share) > 0.5


def test_label_skew_on_sst2_tsv():
    if not (SHARED / "sst2").is_dir():
        pytest.skip("shared data absent")
    raw = tiny_raw(data={"kind": "tsv", "dir": str(SHARED / "sst2"), "layout": "label_skew",
                         "train_file": "dev.tsv", "test_file": "test.tsv", "num_clients": 3,
                         "partitioner": "dirichlet", "dirichlet_alpha": 0.2,
                         "label_names": ["negative", "positive"],
                         "instruction_template": "Sentiment of: {text}"},
                   eval={"max_per_task": 10})
    fed = build_federation(config_from_dict(raw))
    assert len(fed.clients) == 3
    assert {e.output for c in fed.clients for e in c.train} <= {"negative", "positive"}
    assert all(t.startswith("client") for t in fed.test_by_task)


def test_the_shipped_100_client_sst2_federation_is_skewed_and_fills_every_client():
    """configs/sst2/feddpa_f_n100.toml (the SmolLM2 population run): 100 clients, none empty, most
    training on 16 sentences (Dirichlet sizes are uneven), most holding mostly one sentiment, each
    test set following its client's label mix."""
    if not (SHARED / "sst2").is_dir():
        pytest.skip("shared data absent")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "sst2" / "feddpa_f_n100.toml", [f'data.dir="{SHARED / "sst2"}"'])
    fed = build_federation(cfg)
    assert len(fed.clients) == 100 and cfg.train.clients_per_round == 10
    sizes = [len(c.train) for c in fed.clients]
    assert min(sizes) >= 1 and max(sizes) == 16 and sum(n == 16 for n in sizes) >= 80  # data.max_train_per_client
    assert all(len(t) == 8 for t in fed.test_by_task.values())  # eval.max_per_task

    def top_share(examples) -> float:
        return Counter(e.output for e in examples).most_common(1)[0][1] / len(examples)

    assert sum(top_share(c.train) > 0.8 for c in fed.clients) >= 50  # Dirichlet(0.3): mostly one label
    assert sum(top_share(c.train) < 0.7 for c in fed.clients) >= 5  # and some mixed ones
    # a client's own test set leans the way its training data does
    agree = [Counter(e.output for e in c.train).most_common(1)[0][0]
             == Counter(e.output for e in fed.test_by_task[c.task]).most_common(1)[0][0]
             for c in fed.clients if top_share(c.train) > 0.8 and fed.test_by_task[c.task]]
    assert sum(agree) >= 0.9 * len(agree)


def test_read_tsv_errors(tmp_path: Path):
    p = tmp_path / "x.tsv"
    p.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match="no column 'sentence'"):
        read_tsv(p, "sentence", "label", True, [], "{text}", "t")
    rows = read_tsv(p, "text", "label", True, ["neg", "pos"], "Q: {text}", "t")
    assert rows == [Example("Q: hello", "pos", "t", "pos")]


def test_synthetic_is_deterministic_and_heterogeneous():
    a, b = synthetic.generate("parity", 5, 1), synthetic.generate("parity", 5, 1)
    assert a == b
    assert {e.output for e in synthetic.generate("parity", 50, 0)} == {"even", "odd"}
    assert synthetic.generate("uppercase", 1, 0)[0].output.isupper()


def test_shared_flan8_layout():
    root = shared_flan8()
    if root is None:
        pytest.skip("shared data absent")
    cfg = config_from_dict({"data": {"dir": str(root)}, "eval": {"max_per_task": 5}})
    fed = build_federation(cfg)
    assert len(fed.clients) == 8
    assert fed.clients[2].task == "cola" and len(fed.clients[2].train) == 300
    assert all(len(v) == 5 for v in fed.test_by_task.values())
