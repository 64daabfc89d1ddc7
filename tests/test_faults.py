"""Faults around the run directory: a checkpoint set a crash cannot tear (versions behind a
pointer written last), an --out that cannot be created, and --resume of a run stopped before
its first checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from typer.testing import CliRunner

from fedblend.cli import app
from fedblend.store import files
from fedblend.store import rundir as rd
from fedblend.store.files import commit_version, read_version
from fedblend.store.rundir import RunDir

TINY = str(ROOT / "configs" / "tiny" / "fedit.toml")


def _st(v: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"global": {"w": torch.full((2,), v)}}


def _versions(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if p.is_dir())


def test_checkpoint_versions_move_the_pointer_last_and_prune_after(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    ck = run.path / "checkpoint"
    run.save_checkpoint(1, _st(1), {0: _st(10), 1: _st(11)}, {"n": 1})
    run.save_checkpoint(2, _st(2), {0: _st(20), 1: _st(21)}, {"n": 2})
    assert _versions(ck) == ["v2"]  # v1 deleted once the pointer named v2
    assert json.loads((ck / "state.json").read_text()) == {"rounds_completed": 2, "counters": {"n": 2}, "version": "v2"}
    assert run.checkpoint_dir() == ck / "v2"
    server, clients, counters = run.load_checkpoint([0, 1, 2])
    assert server["global"]["w"][0] == 2 and clients[1]["global"]["w"][0] == 21 and clients[2] == {}
    assert counters == {"n": 2}


def test_a_crash_before_the_pointer_moves_leaves_the_old_checkpoint_whole(tmp_path: Path, monkeypatch):
    run = RunDir(tmp_path / "run")
    ck = run.path / "checkpoint"
    run.save_checkpoint(1, _st(1), {0: _st(10), 1: _st(11)}, {"n": 1})
    real_save = rd.save_state

    def die_after_server(path, state, meta=None):  # the writer dies between two files of the set
        real_save(path, state, meta)
        if path.name == "server.safetensors":
            raise SystemExit("killed")

    monkeypatch.setattr(rd, "save_state", die_after_server)
    with pytest.raises(SystemExit):
        run.save_checkpoint(2, _st(2), {0: _st(20), 1: _st(21)}, {"n": 2})
    monkeypatch.setattr(rd, "save_state", real_save)
    server, clients, counters = run.load_checkpoint([0, 1])
    assert (server["global"]["w"][0], clients[0]["global"]["w"][0], counters) == (1, 10, {"n": 1})

    # killed after the new version was renamed into place, before the pointer moved: a SIGKILL
    # cannot be caught, so leave the directory as such a death would
    real_write = files.atomic_write

    def die_before_pointer(path, data, durable=False):
        if path.name == "state.json":
            raise SystemExit("killed")
        real_write(path, data, durable)

    monkeypatch.setattr(files, "atomic_write", die_before_pointer)
    with pytest.raises(SystemExit):
        run.save_checkpoint(2, _st(2), {0: _st(20), 1: _st(21)}, {"n": 2})
    monkeypatch.setattr(files, "atomic_write", real_write)
    assert _versions(ck) == ["v1", "v2"]  # v2 complete on disk, but nothing names it
    server, clients, counters = run.load_checkpoint([0, 1])
    assert (server["global"]["w"][0], clients[1]["global"]["w"][0], counters) == (1, 11, {"n": 1})
    (ck / ".tmp-v3-x").mkdir()  # temporaries a killed writer left: of a version, of the pointer
    (ck / ".state.json.tmp-k1llme").write_text("{")
    run.save_checkpoint(3, _st(3), {0: _st(30)}, {"n": 3})
    assert sorted(p.name for p in ck.iterdir()) == ["state.json", "v3"]


def test_commit_version_never_overwrites_the_version_the_pointer_names(tmp_path: Path):
    root = tmp_path / "store"

    def writer(v: str):
        return lambda d: (d / "x").write_text(v)

    commit_version(root, 4, writer("a"), {})
    d = commit_version(root, 4, writer("b"), {})  # the same number again (e.g. a re-run round)
    assert d.name == "v4-1" and read_version(root)[0] == d and (d / "x").read_text() == "b"
    assert _versions(root) == ["v4-1"]


def test_a_checkpoint_of_the_unversioned_layout_still_loads_and_is_replaced(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    ck = run.path / "checkpoint"
    files.save_state(ck / "server.safetensors", _st(5))
    files.save_state(ck / "clients" / "0.safetensors", _st(50))
    (ck / "state.json").write_text(json.dumps({"rounds_completed": 5, "counters": {"n": 5}}))
    server, clients, _ = run.load_checkpoint([0])
    assert server["global"]["w"][0] == 5 and clients[0]["global"]["w"][0] == 50
    run.save_checkpoint(6, _st(6), {0: _st(60)}, {"n": 6})
    assert sorted(p.name for p in ck.iterdir()) == ["state.json", "v6"]


def test_metrics_ignore_a_last_line_cut_short(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert run.rounds() == [{"round": 0}, {"round": 1}]
    (run.path / "metrics.jsonl").write_text('{"round": 0}\n{"rou\n{"round": 2}\n')
    with pytest.raises(json.JSONDecodeError):  # damage inside the file is not silently skipped
        run.rounds()


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_out_that_cannot_be_created_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, monkeypatch, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub" / "run"
    else:
        # root ignores permission bits; make the read-only refusal the kernel gives a user
        ro = tmp_path / "ro"
        ro.mkdir()
        real_mkdir = Path.mkdir

        def refuse(self, *a, **k):
            if self.parent == ro:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", refuse)
        out = ro / "a" / "run"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = CliRunner().invoke(app, ["run", TINY, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(out) in lines[0].replace("\n", ""), res.output
    assert "cannot create" in lines[0] and "Traceback" not in res.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_from_round_0(tmp_path: Path):
    out = tmp_path / "run"
    args = ["run", TINY, "--out", str(out), "--set", "engine.progress=false", "--set", "eval.max_new_tokens=2",
            "--set", "data.synthetic_test_per_task=2"]
    ref = CliRunner().invoke(app, [*args[:3], str(tmp_path / "ref"), *args[4:]])
    assert ref.exit_code == 0, ref.output
    # what a SIGKILL during round 0 leaves: status running, round 0 half logged, no checkpoint
    from fedblend.config import load_config

    RunDir(out).start(load_config(TINY, args[5::2]).to_dict(), resume=False)
    (out / "metrics.jsonl").write_text('{"round": 0, "lo')
    assert json.loads((out / "status.json").read_text())["status"] == "running"
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert res.output.count("starting from round 0") == 1, res.output
    run = RunDir(out)
    assert run.complete and [r["round"] for r in run.rounds()] == [0, 1]
    got, want = run.summary(), RunDir(tmp_path / "ref").summary()
    assert got["clients"] == want["clients"] and got["comm"] == want["comm"]
    assert got["resumed_at_round"] is None

    # a directory that holds something else is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["run", TINY, "--out", str(other), "--resume"])
    assert res.exit_code == 2 and "not a fedblend run" in res.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_resume_from_a_checkpoint_of_the_unversioned_layout_keeps_every_client_state(tmp_path: Path, monkeypatch):
    """A checkpoint written before client states moved into the run's store
    (checkpoint/server.safetensors, checkpoint/clients/<cid>.safetensors, no version): the
    resume adopts every client's state (here the last round's, so the finished run's client
    states are exactly the checkpoint's)."""
    import shutil

    from conftest import tiny_raw

    from fedblend.config import config_from_dict
    from fedblend.runner import run_experiment
    from fedblend.signals import Interrupted

    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t", train={"rounds": 2}))
    original = RunDir.save_checkpoint

    def stop_at_the_last(self, rounds_completed, *a, **kw):
        original(self, rounds_completed, *a, **kw)
        if rounds_completed == 2:
            raise Interrupted("SIGTERM")

    monkeypatch.setattr(RunDir, "save_checkpoint", stop_at_the_last)
    out = tmp_path / "old"
    with pytest.raises(Interrupted):
        run_experiment(cfg, out)
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    ck = out / "checkpoint"
    v = RunDir(out).checkpoint_dir()
    shutil.move(v / "server.safetensors", ck / "server.safetensors")
    saved = {}
    for p in sorted((out / "clients").glob("*.safetensors")):  # each client's pointer
        saved[int(p.stem)] = files.load_state(p)
        files.save_state(ck / "clients" / p.name, saved[int(p.stem)])
    shutil.rmtree(out / "clients")
    shutil.rmtree(v)
    state = json.loads((ck / "state.json").read_text())
    state.pop("version", None)
    (ck / "state.json").write_text(json.dumps(state))
    assert sorted(saved) == [0, 1, 2]

    assert run_experiment(cfg, out, resume=True)["resumed_at_round"] == 2
    for cid, want in saved.items():
        got = files.load_state(out / "final" / "clients" / f"{cid}.safetensors")
        assert got.keys() == want.keys() == {"local"}
        assert all(torch.equal(got["local"][k], want["local"][k]) for k in want["local"])


def test_deploy_resume_of_a_run_without_checkpoint_starts_it_over_and_of_a_complete_run_is_refused(tmp_path: Path):
    # `fedblend deploy local|sim --resume` decides before any daemon starts, as `run --resume` does
    from fedblend.config import load_config
    from fedblend.deploy.local import check_resume
    from fedblend.errors import FedblendError

    never = tmp_path / "never"
    assert check_resume(never, resume=False) is None
    assert "starting from round 0" in check_resume(never, resume=True)
    killed = tmp_path / "killed"  # what a SIGKILL before the first checkpoint leaves
    RunDir(killed).start(load_config(TINY).to_dict(), resume=False)
    assert check_resume(killed, resume=True) == f"{killed}: no checkpoint yet (stopped before its first); starting from round 0"
    (killed / "checkpoint").mkdir()
    (killed / "checkpoint" / "state.json").write_text('{"rounds_completed": 1}')
    assert check_resume(killed, resume=True) is None  # continues from the checkpoint
    (killed / "summary.json").write_text("{}")  # a run is complete once its summary is written
    with pytest.raises(FedblendError, match="already complete"):
        check_resume(killed, resume=True)
