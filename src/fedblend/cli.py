"""The ``fedblend`` command line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer
from rich.console import Console
from rich.table import Table

from fedblend.errors import FedblendError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")]


def _fail(e: FedblendError) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=e.exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-input error into one red line on stderr and exit code 2."""
    try:
        yield
    except FedblendError as e:
        _fail(e)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(summary: dict[str, Any], out: Path | None = None) -> None:
    """The results table of one run, from its summary."""
    title = f"{summary['algorithm']} - {summary['rounds']} rounds - metric {summary.get('metric')}"
    t = Table(title=title)
    if "clients" in summary and summary["clients"] and "P" in next(iter(summary["clients"].values())):
        t.add_column("client", justify="right")
        t.add_column("task")
        t.add_column("P", justify="right")
        t.add_column("TTP", justify="right")
        for cid, c in summary["clients"].items():
            t.add_row(cid, c["task"], f"{c['P']:.4f}", f"{c['TTP']:.4f}")
        t.add_row("mean", "", f"{summary['mean']['P']:.4f}", f"{summary['mean']['TTP']:.4f}", style="bold")
        console.print(t)
    if "accuracy" in summary:
        acc = Table(title="accuracy")
        keys = [k for k in summary["accuracy"] if k != "per_client"]
        for k in keys:
            acc.add_column(k, justify="right")
        acc.add_row(*[("n/a" if summary["accuracy"][k] is None else f"{summary['accuracy'][k]:.4f}") for k in keys])
        console.print(acc)
    comm, tm = summary.get("comm", {}), summary.get("time", {})
    console.print(
        f"sent up {_fmt_bytes(comm.get('bytes_up', 0))}, down {_fmt_bytes(comm.get('bytes_down', 0))}; "
        f"wall {tm.get('wall_s', 0):.1f} s; peak RSS {summary.get('memory', {}).get('peak_rss_mb', 0):.0f} MB"
        + (f"; run dir {out}" if out else "")
    )


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
) -> None:
    """Run one experiment and write its run directory."""
    from fedblend.config import load_config
    from fedblend.experiment import run_experiment
    from fedblend.signals import Interrupted, record_interrupt, sigterm_interrupts

    with user_errors():
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        try:
            with sigterm_interrupts():
                summary = run_experiment(cfg, out_dir, resume=resume)
        except KeyboardInterrupt as e:  # status.json says interrupted; say how to resume
            hint = record_interrupt(out_dir, sys.argv[1:], "SIGTERM" if isinstance(e, Interrupted) else "SIGINT")
            err_console.print(hint or "interrupted", highlight=False, soft_wrap=True)
            raise typer.Exit(code=143 if isinstance(e, Interrupted) else 130) from None
    print_summary(summary, out_dir)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a completed text run directory")],
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="new run directory for the re-evaluation")] = ...,
) -> None:
    """Re-evaluate a completed run with other eval.* settings (e.g. eval.weighting=static)."""
    from fedblend.experiment import evaluate_run

    with user_errors():
        summary = evaluate_run(run_dir, set_ or [], out)
    print_summary(summary, out)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a completed run directory")]) -> None:
    """Render DIR/report.html (plots of losses, scores, bytes)."""
    from fedblend.reports.html import write_report

    with user_errors():
        path = write_report(run_dir)
    console.print(f"wrote {path}")


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="a completed run directory")]) -> None:
    """Print the results table of a completed run."""
    from fedblend.reports.rundir import RunDir

    r = RunDir(run_dir)
    if not r.complete:
        _fail(FedblendError(f"{run_dir}: no summary.json (the run did not complete)"))
    print_summary(r.summary(), run_dir)


def _print_compare(result: dict[str, Any], out: Path) -> None:
    t = Table(title="comparison (same federation and seed)")
    for col in ("method", "mean P", "mean TTP", "bytes up", "bytes down", "wall s"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in result["runs"]:
        p = f"{r['P']:.4f}" if "P" in r else "-"
        ttp = f"{r['TTP']:.4f}" if "TTP" in r else "-"
        t.add_row(r["label"], p, ttp, _fmt_bytes(r["bytes_up"]), _fmt_bytes(r["bytes_down"]), f"{r['wall_s']:.1f}")
    console.print(t)
    metric = next((r["metric"] for r in result["runs"] if "metric" in r), None)
    if metric:
        console.print(f"P and TTP are mean {metric} over clients; details in {out}/compare.json and {out}/report.html")


@app.command()
def compare(
    configs: Annotated[list[Path], typer.Argument(help="experiment configs to run side by side")],
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="comparison directory")] = Path("runs/compare"),
    resume: Annotated[bool, typer.Option("--resume", help="reuse completed runs, resume unfinished ones")] = False,
) -> None:
    """Run several configs (same overrides) and print one table; writes compare.json + report."""
    from fedblend.compare import load_configs, run_compare

    with user_errors():
        cfgs = load_configs(configs, set_ or [])
        result = run_compare(cfgs, out, resume=resume)
    _print_compare(result, out)


@app.command()
def demo(
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="comparison directory")] = Path("runs/demo"),
) -> None:
    """The embedded default: local vs fedit with SmolLM2 on a small flan8 federation, offline."""
    from fedblend.compare import demo_configs, run_compare

    with user_errors():
        cfgs = demo_configs(set_ or [])
        result = run_compare(cfgs, out, resume=True)
    _print_compare(result, out)


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
