"""What a newcomer trips on: plain progress in logs, show on any directory, reused runs named,
one typo suggestion, --set errors named as such, clean --help, the --resume hint on Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from conftest import ROOT, tiny_raw
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.signals import resume_command
from fedblend.store.rundir import RunDir

TINY = str(ROOT / "configs" / "tiny" / "fedit.toml")


def test_plain_round_lines_when_stdout_is_not_a_terminal(tmp_path: Path):
    # CliRunner's stdout is not a terminal, like a CI log or nohup.out
    res = CliRunner().invoke(app, ["run", TINY, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rounds = [ln for ln in lines if ln.startswith("[tiny-fedit seed 7] round ")]
    assert [ln.split(":")[0] for ln in rounds] == ["[tiny-fedit seed 7] round 1/2", "[tiny-fedit seed 7] round 2/2"]
    logged = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[1] == f"[tiny-fedit seed 7] round 2/2: loss {logged[1]['loss']:.3f}, {logged[1]['seconds']:.1f} s"
    assert any(ln.startswith("[tiny-fedit seed 7] evaluate: 36 test instances on 3 clients") for ln in lines)
    assert "━" not in res.output.split("┏")[0]  # no rich bar drawn into the log before the table


def test_show_compare_and_reused_runs(tmp_path: Path):
    local = tmp_path / "local.toml"
    local.write_text(tomli_w.dumps(tiny_raw(algorithm="local", name="tiny-local")))
    out = tmp_path / "cmp"
    args = ["compare", TINY, str(local), "--out", str(out), "--set", "engine.progress=false"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "finished run(s)" not in first.output
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "reused 2 finished run(s)" in again.output
    assert "fedit" in again.output.split("reused", 1)[1] and "local" in again.output.split("reused", 1)[1]
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "comparison" in shown.output and "fedit" in shown.output and "local" in shown.output
    (tmp_path / "empty").mkdir()
    neither = runner.invoke(app, ["show", str(tmp_path / "empty")])
    assert neither.exit_code == 2
    assert f"{tmp_path / 'empty'}: not a run directory" in " ".join(neither.output.split())


def test_typo_suggested_once():
    res = CliRunner().invoke(app, ["runn"])
    assert res.exit_code == 2
    assert res.output.count("Did you mean 'run'?") == 1


def test_unknown_set_key_is_named_as_an_override(tmp_path: Path):
    res = CliRunner().invoke(app, ["run", TINY, "--set", "train.bogus=3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "--set train.bogus=3: unknown key" in res.output and "fedit.toml" not in res.output
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(), ["bogus.x=1"], source="file.toml")
    assert str(e.value) == "--set bogus.x=1: unknown key"
    with pytest.raises(ConfigError) as e:  # a bad key in the file is still reported against the file
        config_from_dict({"train": {"bogus": 1}}, ["train.rounds=2"], source="file.toml")
    assert str(e.value) == "file.toml: train.bogus: unknown key"


def test_help_has_no_restructuredtext():
    runner = CliRunner()
    for cmd in ([], ["run"], ["evaluate"], ["show"], ["compare"], ["demo"], ["report"], ["deploy"]):
        res = runner.invoke(app, [*cmd, "--help"])
        assert res.exit_code == 0 and "``" not in res.output, (cmd, res.output)


def test_ctrl_c_prints_the_resume_hint_that_works(tmp_path: Path, monkeypatch):
    original = RunDir.save_checkpoint

    def interrupted(self, rounds_completed, *a, **kw):
        original(self, rounds_completed, *a, **kw)
        raise KeyboardInterrupt  # Ctrl-C right after round 1's checkpoint

    monkeypatch.setattr(RunDir, "save_checkpoint", interrupted)
    out = tmp_path / "r"
    base = ["run", TINY, "--out", str(out), "--set", "engine.progress=false"]
    runner = CliRunner()
    res = runner.invoke(app, base)
    assert res.exit_code == 130
    hint = " ".join(res.output.split())
    assert f"interrupted (SIGINT) after round 1; continue with: fedblend run {TINY} --out {out} " \
        "--set engine.progress=false --resume" in hint
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    resumed = runner.invoke(app, [*base, "--resume"])  # the hinted command finishes the run
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "summary.json").read_text())["resumed_at_round"] == 1
    assert resume_command(["run", "c.toml"], tmp_path / "none") == \
        f"fedblend run c.toml --out {tmp_path / 'none'} --resume"


def test_sigterm_during_compare_says_how_to_continue(tmp_path: Path, monkeypatch):
    """SIGTERM in a multi-run command: the run under way is marked interrupted, the finished
    ones stay, stderr gives the command that continues, and that command finishes."""
    from fedblend.signals import Interrupted

    original = RunDir.save_checkpoint
    calls = []

    def preempted(self, rounds_completed, *a, **kw):
        original(self, rounds_completed, *a, **kw)
        calls.append(self.path)
        if len(calls) == 3:  # the second seed's first checkpoint (tiny: 2 rounds per run)
            raise Interrupted("SIGTERM")

    monkeypatch.setattr(RunDir, "save_checkpoint", preempted)
    out = tmp_path / "c"
    base = ["compare", TINY, "--set", "engine.progress=false", "--out", str(out), "--seeds", "2"]
    runner = CliRunner()
    res = runner.invoke(app, base)
    assert res.exit_code == 143, res.output
    hint = " ".join(res.output.split())
    assert f"interrupted (SIGTERM); finished runs are kept, continue with: fedblend {' '.join(base)} --resume" in hint
    seed_dirs = sorted((out / "fedit").iterdir())
    assert [d.name for d in seed_dirs] == ["seed_7", "seed_8"]  # the tiny config's seed 7, then 8
    assert RunDir(seed_dirs[0]).complete
    assert json.loads((seed_dirs[1] / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    resumed = runner.invoke(app, [*base, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "reused 1 finished run(s)" in " ".join(resumed.output.split())
    assert json.loads((seed_dirs[1] / "summary.json").read_text())["resumed_at_round"] == 1


def test_malformed_data_through_the_cli_exits_2_naming_the_file(tmp_path: Path, flan_like: Path):
    # a training file that is not JSON: one line naming it, exit code 2, no summary written
    bad = flan_like / "local_training_1.json"
    bad.write_text('[{"instruction": "alpha question 0", "output": ')
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", TINY, "--out", str(out), "--set", "data.kind='instructions'",
                                   "--set", f"data.dir='{flan_like}'", "--set", "engine.progress=false"])
    assert res.exit_code == 2, res.output
    assert "local_training_1.json" in res.output and "Traceback" not in res.output
    assert not (out / "summary.json").exists()
