"""``compare --seeds`` / ``run --seeds`` on the tiny model: one run directory per seed, the
same seeds for every method, intervals in compare.json from the runs' per-instance records,
and third-party warnings kept in the run's log."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from conftest import ROOT, fitted_raw, informative
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.config import config_from_dict


def test_compare_with_seeds_writes_intervals_per_method_and_pair(tmp_path, fitted_model):
    from fedblend.compare import run_compare, seed_list

    cfgs = [config_from_dict(fitted_raw(fitted_model, algorithm=a, train={"rounds": 1},
                                      data={"synthetic_test_per_task": 6})) for a in ("local", "fedit")]
    out = tmp_path / "cmp"
    res = run_compare(cfgs, out, seeds=seed_list(cfgs[0].seed, 2))
    assert res["seeds"] == [3, 4]
    for label in ("local", "fedit"):
        for s in (3, 4):
            summary = json.loads((out / label / f"seed_{s}" / "summary.json").read_text())
            assert summary["seed"] == s
    saved = json.loads((out / "compare.json").read_text())
    st = saved["stats"]["methods"]
    for label in ("local", "fedit"):
        cell = st[label]["P"]
        assert set(cell) >= {"mean", "sd", "lo", "hi", "half", "per_seed"} and cell["seeds"] == 2
        # the per-instance records reproduce what each run's summary reports
        for s, v in zip((3, 4), cell["per_seed"], strict=True):
            summary = informative(json.loads((out / label / f"seed_{s}" / "summary.json").read_text()))
            assert v == pytest.approx(summary["mean"]["P"])
            assert st[label]["TTP"]["per_seed"][(s - 3)] == pytest.approx(summary["mean"]["TTP"])
        assert {f"P[client {k}]" for k in range(3)} <= set(st[label])
        assert cell["lo"] <= cell["mean"] <= cell["hi"]
    pairs = {(p["a"], p["b"], p["metric"]) for p in saved["stats"]["pairs"]}
    assert pairs == {("local", "fedit", "P"), ("local", "fedit", "TTP")}
    assert all(isinstance(p["diff"]["significant"], bool) for p in saved["stats"]["pairs"])
    assert "error bars" in (out / "report.html").read_text()
    # the seeds change the federation's subsample: different test instances per seed
    preds = {s: (out / "fedit" / f"seed_{s}" / "eval" / "predictions.jsonl").read_text() for s in (3, 4)}
    assert preds[3] != preds[4]


def test_run_with_seeds_cli_prints_intervals(tmp_path):
    out = tmp_path / "multi"
    r = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "tiny" / "fedit.toml"), "--seeds", "2",
                                 "--out", str(out), "--set", "engine.progress=false",
                                 "--set", "train.rounds=1", "--set", "data.synthetic_test_per_task=3"])
    assert r.exit_code == 0, r.output
    assert (out / "seed_7" / "summary.json").is_file() and (out / "seed_8" / "summary.json").is_file()
    assert "±" in r.output and "half-width of the 95% bootstrap interval over 2 seeds" in r.output
    assert json.loads((out / "compare.json").read_text())["stats"]["methods"]["fedit"]["P"]["seeds"] == 2


def test_third_party_warnings_and_logs_go_to_the_run_log(tmp_path, capfd):
    from fedblend.runlog import third_party_to

    log = tmp_path / "run" / "run.log"
    with third_party_to(log):
        warnings.warn("a deprecated thing", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("loading noise")
        logging.getLogger("flwr").warning("flower noise")
    err = capfd.readouterr().err
    assert "deprecated thing" not in err and "noise" not in err
    text = log.read_text()
    assert "a deprecated thing" in text and "loading noise" in text and "flower noise" in text
    # outside a run, the handlers are back as they were
    assert not any(getattr(h, "baseFilename", None) == str(log) for h in logging.getLogger("flwr").handlers)


def test_vision_records_reproduce_overall_and_tail_accuracy(tmp_path):
    from fedblend.config import load_config
    from fedblend.evidence import run_strata
    from fedblend.runner import run_experiment
    from fedblend.stats import bootstrap

    cfg = load_config(ROOT / "configs" / "tiny" / "clip_smoke.toml",
                      [f"vision.cache_dir='{tmp_path / 'cache'}'", "engine.progress=false", "tripleplay.gan=false"])
    s = run_experiment(cfg, tmp_path / "run")
    strata = run_strata(tmp_path / "run")
    assert bootstrap([strata["accuracy"]])["mean"] == pytest.approx(s["accuracy"]["overall"])
    assert bootstrap([strata["tail accuracy"]])["mean"] == pytest.approx(s["accuracy"]["tail"])
