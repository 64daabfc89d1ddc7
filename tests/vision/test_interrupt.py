"""SIGTERM mid-run (what a batch scheduler sends on preemption): status.json says
``interrupted`` with the last checkpointed round and the exact resume command, stderr prints
it, and resuming gives the same final model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from fedblend.runner import run_experiment

from .conftest import REPO
from .test_e2e import _smoke

OVERRIDES = ["algorithm='fedavg_adapter'", "tripleplay.gan=false", "train.rounds=4", "train.local_epochs=2",
             "engine.threads=1"]  # one thread in both processes: bit-identical float sums


# the CLI, but the run waits after checkpointing round 1 until a signal ends the wait: the
# SIGTERM below always lands mid-run (it used to race the 3 remaining rounds)
HOLD_AFTER_ROUND_1 = """
import sys, time
from fedblend.store.rundir import RunDir
save = RunDir.save_checkpoint
def save_then_hold(self, rounds_completed, *a, **k):
    save(self, rounds_completed, *a, **k)
    while rounds_completed == 1:
        time.sleep(0.05)
RunDir.save_checkpoint = save_then_hold
from fedblend.cli import main
sys.argv = ["fedblend", *sys.argv[1:]]
main()
"""


def _cli(args: list[str], cwd, hold: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    entry = ["-c", HOLD_AFTER_ROUND_1] if hold else ["-m", "fedblend.cli"]
    return subprocess.Popen([sys.executable, *entry, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_marks_the_run_interrupted_and_resume_matches(tmp_path):
    from safetensors.torch import load_file

    sets = [f"vision.cache_dir='{tmp_path / 'cache'}'", "engine.progress=false", *OVERRIDES]
    args = ["run", str(REPO / "configs" / "tiny" / "clip_smoke.toml"), "--out", str(tmp_path / "cut")]
    for s in sets:
        args += ["--set", s]
    proc = _cli(args, tmp_path, hold=True)
    checkpoint = tmp_path / "cut" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 600  # a hang guard only
    while not checkpoint.is_file():  # round 1 finished and checkpointed; the run now waits
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no round finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["reason"] == "SIGTERM"
    done = status["rounds_completed"]
    assert done == 1, status
    cmd = shlex.split(status["resume"])
    assert cmd[0] == "fedblend" and cmd[-1] == "--resume" and cmd[1:-1] == args
    assert f"after round {done}" in err and status["resume"] in err.replace("\n", " ")

    resumed = _cli(cmd[1:], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut["resumed_at_round"] == done

    whole = run_experiment(_smoke(tmp_path, *OVERRIDES), tmp_path / "whole")
    a = load_file(str(tmp_path / "cut" / "adapters" / "global" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "whole" / "adapters" / "global" / "adapter.safetensors"))
    assert set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)
    assert cut["accuracy"]["overall"] == whole["accuracy"]["overall"]
