"""fedblend: federated, personalized, parameter-efficient fine-tuning (FedDPA on text LMs, TriplePlay on image features).

Run, compare, re-evaluate and report experiments; `fedblend demo` runs the embedded default.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer

from fedblend.console import (
    _fail,
    console,
    err_console,
    fmt_bytes,
    print_summary,
    table,
    user_errors,
)
from fedblend.errors import FedblendError

# suggest_commands=False: click itself now says "Did you mean 'run'?"; typer's copy doubled it
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, suggest_commands=False)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")]


def _sets(set_: list[str] | None) -> list[str]:
    return [a for o in set_ or [] for a in ("--set", o)]


@contextlib.contextmanager
def _interruptible(argv: list[str], out: Path, one_run: bool = False, resume_flag: bool = True) -> Iterator[None]:
    """SIGTERM (a scheduler's preemption) or Ctrl-C while experiments run: the run under way
    says ``interrupted`` in its status.json (RunDir) and stderr gives the command that
    continues, then exit 143 / 130. For ``one_run`` (``fedblend run`` into ``out``) that
    command also goes into its status.json; otherwise (compare, demo, reproduce, run --seeds) finished runs
    stay, and the command is ``argv`` with ``--resume`` where it has that flag (demo and
    reproduce always reuse finished runs and resume unfinished ones)."""
    from fedblend.signals import Interrupted, record_interrupt, resume_command, sigterm_interrupts

    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt as e:
        sig = "SIGTERM" if isinstance(e, Interrupted) else "SIGINT"
        if one_run:
            hint = record_interrupt(out, argv, sig) or "interrupted"
        else:
            cmd = resume_command(argv, out) if resume_flag else shlex.join(["fedblend", *argv])
            hint = f"interrupted ({sig}); finished runs are kept, continue with:\n  {cmd}"
        err_console.print(hint, highlight=False, soft_wrap=True)
        raise typer.Exit(code=143 if isinstance(e, Interrupted) else 130) from None


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
    seeds: SeedsOpt = None,
) -> None:
    """Run one experiment and write its run directory (with --seeds N: DIR/seed_<s>/ each)."""
    from fedblend.config import load_config
    from fedblend.runner import run_experiment
    from fedblend.store.rundir import create_dir

    with user_errors():
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        create_dir(out_dir)  # one line naming it (exit 2) when it cannot be made
        argv = ["run", str(config), "--out", str(out_dir), *_sets(set_)]
        if seeds:
            from fedblend.compare import run_compare, seed_list

            with _interruptible([*argv, "--seeds", str(seeds)], out_dir):
                result = run_compare([cfg], out_dir, resume=resume, seeds=seed_list(cfg.seed, seeds), flat=True)
        else:
            with _interruptible(argv, out_dir, one_run=True):
                summary = run_experiment(cfg, out_dir, resume=resume)
    if seeds:
        _print_compare(result, out_dir)
        return
    print_summary(summary, out_dir)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a completed run directory (text or vision)")],
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="new run directory for the re-evaluation")] = ...,
    sweep: Annotated[list[str] | None, typer.Option(
        "--sweep", help="eval.key=v1,v2,...: one re-evaluation per value (several --sweep: a grid), "
        "each in OUT/<setting>, table in OUT/sweep.json")] = None,
) -> None:
    """Re-evaluate a completed run with other inference settings (e.g. feddpa.weighting=static)."""
    from fedblend.runner import evaluate_run
    from fedblend.sweep import run_sweep

    with user_errors():
        if sweep:
            _print_sweep(run_sweep(run_dir, set_ or [], sweep, out), out)
            return
        summary = evaluate_run(run_dir, set_ or [], out)
    print_summary(summary, out)


def _print_sweep(result: dict[str, Any], out: Path) -> None:
    t = table(f"{result['algorithm']} re-evaluated from {result['source']}",
              [("setting", "name"), ("mean P", "number"), ("mean TTP", "number"), ("eval s", "number")])
    for r in result["rows"]:
        p = f"{r['P']:.4f}" if "P" in r else "-"
        ttp = f"{r['TTP']:.4f}" if "TTP" in r else "-"
        t.add_row(r["label"], p, ttp, f"{r['eval_s']:.1f}" if r.get("eval_s") is not None else "-")
    console.print(t)
    reused = [r["label"] for r in result["rows"] if r.get("reused")]
    if reused:
        console.print(f"reused finished re-evaluations: {', '.join(reused)}")
    console.print(f"same trained adapters for every setting; details in {out}/sweep.json")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a completed run directory")]) -> None:
    """Render DIR/report.html (plots of losses, scores, bytes)."""
    from fedblend.reports.html import write_report

    with user_errors():
        path = write_report(run_dir)
    console.print(f"wrote {path}")


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="a run, comparison or sweep directory")]) -> None:
    """Print the results table of a completed run, a comparison or an evaluation sweep."""
    import json

    from fedblend.store.rundir import RunDir

    r = RunDir(run_dir)
    if r.complete:
        print_summary(r.summary(), run_dir)
    elif (run_dir / "compare.json").is_file():
        _print_compare(json.loads((run_dir / "compare.json").read_text()), run_dir)
    elif (run_dir / "sweep.json").is_file():
        _print_sweep(json.loads((run_dir / "sweep.json").read_text()), run_dir)
    elif (run_dir / "status.json").is_file():
        _fail(FedblendError(f"{run_dir}: no summary.json (the run did not complete)"))
    else:
        _fail(FedblendError(f"{run_dir}: not a run directory"))


def _print_compare(result: dict[str, Any], out: Path) -> None:
    from rich.markup import escape

    from fedblend.compare import interval_note
    from fedblend.stats import fmt

    per = (result.get("stats") or {}).get("methods", {})
    vision = any("accuracy" in r for r in result["runs"])
    cols = ("accuracy", "tail accuracy") if vision else ("P", "TTP")
    n = len(result.get("seeds") or [])
    t = table(f"comparison (same federation; {n} seed{'s' if n != 1 else ''} per method)",
              [("method", "name"), *((c if vision else f"mean {c}", "number") for c in cols),
               ("bytes up", "number"), ("bytes down", "number"), ("wall s", "number")])
    for r in result["runs"]:
        cells = []
        for c in cols:
            st = per.get(r["label"], {}).get(c)
            point = r.get(c) if not vision else (r.get("accuracy") or {}).get("overall" if c == "accuracy" else "tail")
            cells.append(fmt(st) if st else (f"{point:.4f}" if point is not None else "-"))
        t.add_row(escape(r["label"]), *cells, fmt_bytes(r["bytes_up"]), fmt_bytes(r["bytes_down"]), f"{r['wall_s']:.1f}")
    console.print(t)
    pairs = (result.get("stats") or {}).get("pairs", [])
    if pairs:
        d = table("paired differences a - b (paired by seed and test instance)",
                  [("a", "name"), ("b", "name"), ("metric", "name"), ("a - b", "number"),
                   ("significant", "number")])
        for p in pairs:
            sig = p["diff"]["significant"]
            d.add_row(escape(p["a"]), escape(p["b"]), escape(p["metric"]), fmt(p["diff"]), "yes *" if sig else "no",
                      style="bold" if sig else None)
        console.print(d)
    if per:
        console.print(f"{interval_note(result)}; * = the interval excludes 0")
    elif (result.get("stats") or {}).get("error"):
        console.print(f"no intervals: {result['stats']['error']}")
    data = result.get("data")
    if data:
        name = "built-in synthetic tasks" if data["kind"] == "synthetic" else "flan8"
        console.print(f"data: {name}: {data['description']}", highlight=False, soft_wrap=True)
    metric = next((r["metric"] for r in result["runs"] if "metric" in r), None)
    if metric:
        what = "accuracy on the balanced test set, mean over clients" if vision else f"mean {metric} over clients"
        console.print(f"{'/'.join(cols)}: {what}; details in {out}/compare.json and {out}/report.html")


SeedsOpt = Annotated[
    int | None,
    typer.Option("--seeds", min=1, help="run every method under N seeds (config seed, +1, ...); adds intervals"),
]


@app.command()
def compare(
    configs: Annotated[list[Path], typer.Argument(help="experiment configs to run side by side")],
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="comparison directory")] = Path("runs/compare"),
    resume: Annotated[bool, typer.Option("--resume", help="reuse completed runs, resume unfinished ones")] = False,
    seeds: SeedsOpt = None,
) -> None:
    """Run several configs (same overrides) and print one table; writes compare.json + report."""
    from fedblend.compare import load_configs, run_compare, seed_list

    with user_errors():
        cfgs = load_configs(configs, set_ or [])
        before = _finished_runs(out)
        argv = ["compare", *map(str, configs), *_sets(set_), "--out", str(out),
                *(["--seeds", str(seeds)] if seeds else [])]
        with _interruptible(argv, out):
            result = run_compare(cfgs, out, resume=resume,
                                 seeds=seed_list(cfgs[0].seed, seeds) if seeds else None)
    _say_reused(before, out)
    _print_compare(result, out)


@app.command()
def demo(
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="comparison directory")] = Path("runs/demo"),
    seeds: SeedsOpt = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="a flan8 folder (local_training_<client>.json, test.jsonl); default: "
        "../shared/data/flan8 when present, else built-in synthetic tasks")] = None,
) -> None:
    """Run the embedded default: local vs fedit vs feddpa_f with SmolLM2, offline.

    Four flan8 clients (or built-in synthetic tasks when no flan8 folder is found), 2 seeds,
    with intervals over seeds and test instances. It says what data it runs on and how long it
    should take before it starts.
    """
    from fedblend.compare import (
        DEMO_SEEDS,
        data_notice,
        demo_configs,
        demo_data,
        run_compare,
        seed_list,
    )

    with user_errors():
        cfgs = demo_configs(set_ or [], data)
        n_seeds = seeds or DEMO_SEEDS
        info = demo_data(cfgs[0], n_seeds, overridden=bool(set_))
        console.print(f"fedblend demo: {', '.join(c.algorithm for c in cfgs)}", highlight=False)
        for line in data_notice(info):
            console.print(line, highlight=False, soft_wrap=True)
        before = _finished_runs(out)
        argv = ["demo", *_sets(set_), "--out", str(out), *(["--seeds", str(seeds)] if seeds else []),
                *(["--data", str(data)] if data else [])]
        with _interruptible(argv, out, resume_flag=False):
            result = run_compare(cfgs, out, resume=True, seeds=seed_list(cfgs[0].seed, n_seeds), data=info)
    _say_reused(before, out)
    _print_compare(result, out)


def _finished_runs(out: Path) -> dict[Path, int]:
    """The completed runs under a comparison directory, with their summary's mtime."""
    if not out.is_dir():
        return {}
    return {p.parent: p.stat().st_mtime_ns for p in out.rglob("summary.json")}


def _say_reused(before: dict[Path, int], out: Path) -> None:
    """Name the runs a comparison took from an earlier invocation instead of running them."""
    after = _finished_runs(out)
    reused = sorted(str(p.relative_to(out)) for p, t in before.items() if after.get(p) == t)
    if reused:
        console.print(
            f"reused {len(reused)} finished run(s) in {out}: {', '.join(reused)} "
            "(delete them or choose another --out to run them again)",
            highlight=False, soft_wrap=True,
        )


@app.command()
def reproduce(
    paper: Annotated[str, typer.Argument(help="feddpa or tripleplay")],
    budget: Annotated[str, typer.Option("--budget", help="quick (~15 min, 2 CPU cores), standard (~2 h), paper (GPU)")] = "quick",
    out: Annotated[Path | None, typer.Option("--out", help="output directory")] = None,
    set_: SetOpt = None,
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="number of seeds (default: the budget's)")] = None,
) -> None:
    """Run a paper's protocol at a budget and judge each claim: writes claims.json + report.html."""
    from rich.markup import escape

    from fedblend.reproduce import claim_cells
    from fedblend.reproduce import reproduce as run_reproduce

    out_dir = out or Path("runs") / f"reproduce-{paper}-{budget}"
    argv = ["reproduce", paper, "--budget", budget, "--out", str(out_dir), *_sets(set_),
            *(["--seeds", str(seeds)] if seeds else [])]
    with user_errors(), _interruptible(argv, out_dir, resume_flag=False):
        doc = run_reproduce(paper, budget, out_dir, set_ or [], say=lambda m: console.print(escape(m)),
                            n_seeds=seeds)
    t = table(f"{paper} claims at budget {budget} ({len(doc['seeds'])} seed(s), {doc['wall_s'] / 60:.1f} min)",
              [("claim", "name"), ("measured", "name"), ("a - b", "name"), ("verdict", "name")])
    for c in doc["claims"]:
        t.add_row(escape(c["claim"]), *(escape(x) for x in claim_cells(c)))
    console.print(t)
    console.print(f"± = half-width of the 95% interval; details in {out_dir}/claims.json and {out_dir}/report.html")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="a few minutes on 2 CPU cores")] = False,
    out: Annotated[Path, typer.Option("--out", help="the JSON results file")] = Path("runs/bench.json"),
    data: Annotated[Path, typer.Option("--data", help="flan8 directory")] = Path("../shared/data/flan8"),
    images: Annotated[Path, typer.Option("--images", help="CIFAR-10 parquet directory")] = Path(
        "../shared/data/cifar10"),
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads; 0 = torch's default")] = 0,
    model: Annotated[str, typer.Option("--model", hidden=True, help="tiny: random tiny models (tests)")] = "smollm2",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="precision of the main phases: float32 | bfloat16 | auto (bfloat16 where the "
        "CPU has AMX); FedDPA-T also runs in the other one for bf16_speedup")] = "float32",
) -> None:
    """Measure how close a round comes to the machine's matmul peak; writes --out.

    Training and evaluation efficiency (fedit, feddpa_t on flan8 + SmolLM2) against the matmul
    peak of the precision each ran in (float32 and bfloat16 peaks both measured), bfloat16's
    speed-up over float32 per phase, cross-client TTP speed-up, the naive reference's round
    time, memory per quantization, images/s.
    """
    from fedblend.bench import bench as run_bench
    from fedblend.bench import print_bench

    scale = "tiny" if model == "tiny" else ("quick" if quick else "full")
    with user_errors():
        if model not in ("smollm2", "tiny"):
            raise FedblendError(f"--model: expected smollm2 or tiny, got {model!r}")
        result = run_bench(scale, out, data, images, threads=threads, dtype=dtype,
                           say=lambda m: err_console.print(f"bench: {m}", highlight=False))
    print_bench(result, out)


def _register_subcommands() -> None:
    from fedblend.deploy.cli import deploy_app

    app.add_typer(deploy_app, name="deploy")


_register_subcommands()


def main() -> None:
    try:
        app()
    except FedblendError as e:  # raised outside a command body
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
