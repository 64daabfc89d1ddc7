"""The algorithm registry: one file plus one registry line is a new method (the guide's toy,
tests/toy_algorithm.py), its settings section is validated at load time, old keys say where
they went, and nothing outside the registry tests algorithm names."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw

from fedblend import algorithms
from fedblend.comm.codec import Message
from fedblend.config import REMOVED_KEYS, config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment

SRC = Path(__file__).resolve().parents[1] / "src" / "fedblend"


@pytest.fixture
def toy():
    sys.path.insert(0, str(Path(__file__).parent))
    algorithms.register("uniform_avg", "toy_algorithm:UniformAvg")  # the guide's one line
    yield
    algorithms.unregister("uniform_avg")


def test_the_toy_algorithm_runs_end_to_end_with_its_own_section(toy, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_raw(algorithm="uniform_avg", uniform_avg={"min_examples": 2}))
    assert cfg.section("uniform_avg").min_examples == 2 and cfg.modality == "text"
    assert cfg.to_dict()["uniform_avg"] == {"min_examples": 2}  # the resolved config keeps it
    summary = run_experiment(cfg, tmp_path / "toy")
    assert summary["algorithm"] == "uniform_avg" and summary["comm"]["bytes_up"] > 0
    assert (tmp_path / "toy" / "summary.json").is_file()


def test_the_toy_aggregates_with_uniform_weights(toy) -> None:
    algo = algorithms.make_algorithm(config_from_dict(tiny_raw(algorithm="uniform_avg")))
    one, three = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.0])
    updates = {0: Message({"global": {"w": one}}, 1), 1: Message({"global": {"w": three}}, 9)}
    new = algo.aggregate(0, updates, {"global": {"w": torch.zeros(2)}})
    assert torch.equal(new["global"]["w"], torch.tensor([2.0, 2.0]))  # not (1*1 + 9*3)/10 = 2.8
    # its own setting: clients under min_examples are left out
    algo = algorithms.make_algorithm(config_from_dict(tiny_raw(algorithm="uniform_avg", uniform_avg={"min_examples": 5})))
    assert torch.equal(algo.aggregate(0, updates, {"global": {"w": torch.zeros(2)}})["global"]["w"], three)


@pytest.mark.parametrize(("raw", "overrides", "says"), [
    ({"uniform_avg": {"min_exampels": 2}}, [], "config: uniform_avg.min_exampels: unknown key"),
    ({}, ["uniform_avg.min_examples=0"], "--set uniform_avg.min_examples=0: Input should be greater than or equal to 1"),
    ({"train": {"clients_per_round": 1}}, [], "train.clients_per_round: uniform_avg averages at least 2 clients"),
    ({"unifrom_avg": {}}, [], "config: unifrom_avg: unknown key"),
])
def test_the_toy_settings_are_checked_in_one_line(toy, raw: dict, overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(algorithm="uniform_avg", **raw), overrides)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_another_algorithms_section_may_sit_in_a_config_and_is_still_validated() -> None:
    cfg = config_from_dict(tiny_raw(algorithm="fedit", feddpa={"weighting": "static"}))
    assert cfg.section("feddpa").weighting == "static"  # one file for a comparison of methods
    with pytest.raises(ConfigError, match=r"feddpa.static_weight: Input should be less than or equal to 1"):
        config_from_dict(tiny_raw(algorithm="fedit", feddpa={"static_weight": 2}))


def test_an_aggregation_that_is_not_a_mean_refuses_robust_rules_and_dp(toy) -> None:
    from toy_algorithm import UniformAvg

    class NotAMean(UniformAvg):
        name = "not_a_mean"
        mean_aggregation = False

    sys.modules["toy_algorithm"].NotAMean = NotAMean
    algorithms.register("not_a_mean", "toy_algorithm:NotAMean")
    try:
        for sets in (["aggregate.rule=median"], ["aggregate.clip_norm=1"], ["privacy.clip=1"]):
            with pytest.raises(ConfigError, match=rf"--set {re.escape(sets[0])}: not_a_mean's aggregation is not a mean"):
                config_from_dict(tiny_raw(algorithm="not_a_mean"), sets)
        config_from_dict(tiny_raw(algorithm="not_a_mean"), ["comm.compress=int8"])  # client-side: composes
        config_from_dict(tiny_raw(algorithm="uniform_avg"), ["aggregate.rule=median"])  # a mean: composes
    finally:
        algorithms.unregister("not_a_mean")


def test_equal_rank_methods_refuse_client_ranks_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"lora.client_ranks: fedit needs every client at one rank"):
        config_from_dict(tiny_raw(algorithm="fedit", lora={"client_ranks": [4, 2, 2]}))


@pytest.mark.parametrize("key", sorted(REMOVED_KEYS))
def test_every_moved_key_names_its_new_place(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(), [f"{key}=1"])
    msg = str(e.value)
    assert msg.startswith(f"--set {key}=1: ") and ("moved" in msg or "removed" in msg) and "\n" not in msg
    for new in re.findall(r"\b([a-z_]+\.[a-z_]+)\b", msg.split(": ", 1)[1]):
        section, name = new.split(".")
        schema = {**algorithms.sections()}.get(section)
        if schema is not None:  # the named place exists
            assert name in schema.model_fields, new


def test_every_registered_algorithm_declares_itself() -> None:
    for name in algorithms.names():
        cls = algorithms.algorithm_class(name)
        assert cls.name == name and cls.modality in ("text", "vision") and cls.paper, name
        assert (cls.section is None) == (cls.Settings is None), name
    assert set(algorithms.names("vision")) | set(algorithms.names("text")) == set(algorithms.names())


def test_no_algorithm_name_is_tested_as_a_string_outside_the_registry() -> None:
    names = "|".join(re.escape(n) for n in algorithms.names())
    pattern = re.compile(rf"""(algorithm\s*(==|!=|in|not in)\s*[\[(]?\s*["']({names})["'])"""
                         rf"""|(startswith\(\s*["']({names}))""")
    found = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "algorithms":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or re.search(r"(TEXT|VISION)_ALGORITHMS", line):
                found.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not found, found
