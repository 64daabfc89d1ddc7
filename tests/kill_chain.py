"""One tiny ``fedblend run`` SIGKILLed at seeded instants, resumed with ``--resume`` after each
kill, and compared with the same run undisturbed (used by tests/test_random_kill.py; runnable
alone: ``python tests/kill_chain.py --work DIR``, prints JSON).

Python and the imports are paid once: this process imports fedblend, torch and transformers
(and computes nothing with torch), then forks one child per attempt, which runs the CLI
(``fedblend.cli.main``) with its output in ``DIR/attempt_<i>.log``. A child SIGKILLs itself
(a real SIGKILL: nothing runs after it) at a seeded *event*: the j-th os.replace (every
atomic file write), training step or generation batch of a given phase and round, so that
the kills land in every phase however fast or slow the machine is; a few more kills come from
this process after a seeded delay (start-up). The event keys are those of the undisturbed
reference run, so every planned kill fires: a resumed attempt replays every event from its
checkpoint's round on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "feddpa_t.toml"
OVERRIDES = ["train.rounds=3", "engine.checkpoint_every=1", "engine.progress=false", "engine.threads=1",
             "data.synthetic_train_per_client=8", "data.synthetic_test_per_task=2", "eval.max_new_tokens=4",
             "eval.batch_size=4"]
PHASES = ("setup", "train", "checkpoint", "finish", "eval", "report", "done")


def _install_hooks(target: list | None, events_path: Path | None) -> None:
    """In the child: label every event with (kind, phase, round, j) and SIGKILL this process
    at ``target``; with ``events_path`` write every key there at exit (the reference run)."""
    from fedblend import rounds, runner
    from fedblend.store import rundir
    from fedblend.text.trainer import TextTrainer

    st: dict[str, Any] = {"phase": "setup", "round": -1}
    t0 = time.perf_counter()
    seen: dict[tuple, int] = {}
    log: list[list] = []
    tgt = tuple(target) if target else None

    def hit(kind: str) -> None:
        base = (kind, st["phase"], st["round"])
        j = seen.get(base, 0)
        seen[base] = j + 1
        key = (*base, j)
        if events_path is not None:
            log.append([*key, time.perf_counter() - t0])
        if key == tgt:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace

    def replace(src, dst, *a, **k):
        hit("replace")
        real_replace(src, dst, *a, **k)
        if str(dst).endswith("summary.json"):
            st["phase"] = "done"

    os.replace = replace

    def wrap(obj, name, before=None, after=None, kind=None):
        real = getattr(obj, name)

        def f(*a, **k):
            if before:
                before(*a, **k)
            if kind:
                hit(kind)
            out = real(*a, **k)
            if after:
                after()
            return out

        setattr(obj, name, f)

    def enter_round(cfg, rnd, ids):
        st.update(phase="train", round=rnd)

    def set_phase(p, rnd=None):
        def f(*a, **k):
            st["phase"] = p
            if rnd is not None:
                st["round"] = rnd
        return f

    wrap(rounds, "select_clients", before=enter_round)
    wrap(rundir, "commit_version", before=set_phase("checkpoint"), after=set_phase("train"))
    wrap(runner, "run_round_loop", after=set_phase("finish", 10**6))
    wrap(runner, "evaluate_and_summarize", before=set_phase("eval"))
    wrap(runner, "complete_run", before=set_phase("report"))
    wrap(TextTrainer, "_loss_sum", kind="step")
    wrap(TextTrainer, "_left_pad", kind="gen")
    if events_path is not None:
        import atexit

        atexit.register(lambda: events_path.write_text(json.dumps(log)))


def attempt(work: Path, i: int, out: Path, resume: bool, target: list | None = None,
            delay: float | None = None, events_path: Path | None = None) -> dict[str, Any]:
    """Run the CLI once in a forked child; returns how it ended."""
    log = work / f"attempt_{i}.log"
    argv = ["run", str(CONFIG), "--out", str(out), *[a for o in OVERRIDES for a in ("--set", o)],
            *(["--resume"] if resume else [])]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            _install_hooks(target, events_path)
            from fedblend.cli import main

            sys.argv = ["fedblend", *argv]
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (the child must end in os._exit, never return)
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            if events_path is not None:
                import atexit

                atexit._run_exitfuncs()
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"i": i, "resume": resume, "target": target, "delay": delay, "killed": killed,
            "exit": None if killed else os.WEXITSTATUS(status), "seconds": time.perf_counter() - t0,
            "log": log.read_text(errors="replace")}


def checkpointed(out: Path) -> int:
    p = out / "checkpoint" / "state.json"
    return json.loads(p.read_text())["rounds_completed"] if p.is_file() else 0


def plan(rng: random.Random, kills: int) -> list[str]:
    """The phase of every kill, in the order a run passes them: a few timed kills anywhere,
    then training and checkpoint writing mixed, then finishing and evaluation, then report."""
    n_timed = max(1, kills // 10)
    n_report = max(1, kills * 2 // 15)
    n_eval = max(1, kills // 5)
    n_tc = kills - n_timed - n_report - n_eval
    tc = ["train"] * (n_tc // 2) + ["checkpoint"] * (n_tc - n_tc // 2)
    rng.shuffle(tc)
    ev = ["finish"] * (n_eval // 3) + ["eval"] * (n_eval - n_eval // 3)
    rng.shuffle(ev)
    seq = tc + ev + ["report"] * n_report
    for _ in range(n_timed):
        seq.insert(rng.randrange(len(seq) + 1), "timed")
    return seq


def warm_up() -> None:
    """Everything a run imports lazily, imported once here (no torch computation: forking
    after torch's thread pools started could hang the children)."""
    import io

    import datasets  # noqa: F401
    import matplotlib.pyplot as plt
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fedblend.cli
    import fedblend.reports.html
    import fedblend.runner
    import fedblend.text.modality
    import fedblend.text.trainer  # noqa: F401
    from fedblend.text.metrics import score_one

    score_one("warm up", "warm up")  # the ROUGE scorer (nltk) and its stemmer
    fig, ax = plt.subplots(figsize=(2, 2))  # matplotlib's fonts and PNG writer
    ax.plot([0, 1], [0, 1])
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    warm_up()

    t_import = time.perf_counter() - t_start
    ref_out, out = work / "reference", work / "killed"
    events_path = work / "reference_events.json"
    ref = attempt(work, 0, ref_out, resume=False, events_path=events_path)
    if ref["exit"] != 0:
        raise SystemExit(f"reference run failed:\n{ref['log']}")
    logged = json.loads(events_path.read_text())
    events = [tuple(e[:4]) for e in logged]
    # timed kills land in the start-up: before the reference run's first training step
    setup_s = next(e[4] for e in logged if e[1] == "train")
    rng = random.Random(args.seed)
    results, i, used = [], 0, set()
    for phase in plan(rng, args.kills):
        i += 1
        r0 = checkpointed(out)
        if phase == "timed":
            res = attempt(work, i, out, resume=i > 1, delay=rng.uniform(0.05, 0.8) * setup_s)
        else:
            cands = [e for e in events if e[1] == phase]
            if phase in ("train", "checkpoint"):  # a run never goes back before its checkpoint
                cands = [e for e in cands if e[2] >= r0]
                here = [e for e in cands if e[2] == r0]
                cands = here if here and rng.random() < 0.6 else cands  # spread over the rounds
            if not cands:
                raise SystemExit(f"no {phase} event at or after round {r0} in the reference run")
            fresh = [e for e in cands if e not in used] or cands  # distinct instants where there are
            target = list(rng.choice(fresh))
            used.add(tuple(target))
            res = attempt(work, i, out, resume=i > 1, target=target)
        res.update(phase=phase, resumed_from=r0)
        results.append(res)
    final = attempt(work, i + 1, out, resume=True)
    final.update(phase="final", resumed_from=checkpointed(out))
    results.append(final)
    print(json.dumps({
        "import_s": t_import, "reference_s": ref["seconds"], "setup_s": setup_s, "total_s": time.perf_counter() - t_start,
        "reference": str(ref_out), "killed": str(out), "attempts": results,
    }))


if __name__ == "__main__":
    main()
