"""Terminal output shared by the ``fedblend`` commands (``cli`` and ``deploy.cli``): the results
table of a run and the one-red-line rendering of user errors."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from fedblend.errors import FedblendError

NOT_A_TERMINAL_WIDTH = 1000


class _Console(Console):
    """A rich Console whose tables fit a terminal's width, and which prints full-width when its
    output is not a terminal (a file, a pipe, CI): rich's 80-column default there cut method
    names and broke numbers over two lines. ``COLUMNS`` still sets the width when given."""

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(NOT_A_TERMINAL_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console()
err_console = _Console(stderr=True)


def table(title: str | None, columns: list[tuple[str, str]]) -> Table:
    """A results table: ``columns`` as (header, "name" | "number"). Names wrap (fold) rather than
    being cut with an ellipsis when the terminal is narrow; numbers never break over lines."""
    t = Table(title=title)
    for header, kind in columns:
        if kind == "name":
            t.add_column(header, overflow="fold")
        else:
            t.add_column(header, justify="right", no_wrap=True)
    return t


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


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(summary: dict[str, Any], out: Path | None = None) -> None:
    """The results table of one run, from its summary."""
    if len(summary.get("clients") or {}) > TABLE_MAX_CLIENTS:
        print_distribution(summary, out)
        return
    title = f"{summary['algorithm']} - {summary['rounds']} rounds - metric {summary.get('metric')}"
    t = table(title, [("client", "number"), ("task", "name"), ("P", "number"), ("TTP", "number")])
    if "clients" in summary and summary["clients"] and "P" in next(iter(summary["clients"].values())):
        for cid, c in summary["clients"].items():
            t.add_row(cid, c["task"], f"{c['P']:.4f}", f"{c['TTP']:.4f}")
        t.add_row("mean", "", f"{summary['mean']['P']:.4f}", f"{summary['mean']['TTP']:.4f}", style="bold")
        console.print(t)
    if "accuracy" in summary:
        acc = Table(title="accuracy")
        flat = {k: v for k, v in summary["accuracy"].items() if k not in ("per_client", "reference")}
        ref = summary["accuracy"].get("reference") or {}  # vision: centralized reference rows
        flat.update({f"ref {n}": ref.get(k) for k, n in (("linear_probe", "probe"), ("centralized_adapter", "adapter")) if ref})
        for k in flat:
            acc.add_column(k, justify="right")
        acc.add_row(*[("n/a" if v is None else f"{v:.4f}") for v in flat.values()])
        console.print(acc)
    _cost_line(summary, out)


TABLE_MAX_CLIENTS = 20
"""More evaluated clients than this: the terminal shows their distribution, not a row each."""


def print_distribution(summary: dict[str, Any], out: Path | None = None) -> None:
    """A text run with many clients: the means (with their 95% intervals where the clients
    were sampled), the quantiles of per-client P and TTP, and a histogram of per-client P."""
    ev = summary.get("evaluation") or {}
    dist = ev.get("distribution") or {}
    n, n_eval = ev.get("clients", len(summary["clients"])), ev.get("clients_evaluated", len(summary["clients"]))
    how = (f"a seeded sample of {n_eval:,} of {n:,} clients, TTP on "
           + {"pooled": f"a pooled test set of {ev.get('pooled_test_instances', 0):,} instances",
              "tasks": f"{ev.get('ttp_other_tasks_per_client', 0)} sampled other tasks per client",
              "off": "own task only"}.get(ev.get("ttp", ""), "every task")
           if ev.get("mode") == "sampled" else f"all {n_eval:,} clients, every task")
    t = table(f"{summary['algorithm']} - {summary['rounds']} rounds - metric {summary.get('metric')} - {how}",
              [("", "name"), ("mean", "number"), ("95% interval", "number"),
               *((f"q{q}", "number") for q in ("0", "0.1", "0.25", "0.5", "0.75", "0.9", "1"))])
    for key in ("P", "TTP"):
        ci = ev.get(key)
        q = (dist.get(key) or {}).get("quantiles", {})
        t.add_row(key, f"{summary['mean'][key]:.4f}", f"{ci['lo']:.4f} .. {ci['hi']:.4f}" if ci else "exact",
                  *(f"{q[k]:.3f}" if k in q else "-" for k in ("0", "0.1", "0.25", "0.5", "0.75", "0.9", "1")))
    console.print(t)
    hist = (dist.get("P") or {}).get("histogram")
    if hist and sum(hist["counts"]):
        top = max(hist["counts"])
        console.print("per-client P (clients per bin)")
        for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"], strict=False):
            console.print(f"  {lo:.1f}-{hi:.1f} {'#' * round(30 * c / top):<30} {c}", highlight=False)
    _cost_line(summary, out)


def _cost_line(summary: dict[str, Any], out: Path | None) -> None:
    """The line under a run's table: bytes sent each way, wall time, peak memory, run dir."""
    comm, tm = summary.get("comm", {}), summary.get("time", {})
    console.print(
        f"sent up {fmt_bytes(comm.get('bytes_up', 0))}, down {fmt_bytes(comm.get('bytes_down', 0))}; "
        f"wall {tm.get('wall_s', 0):.1f} s; peak RSS {summary.get('memory', {}).get('peak_rss_mb', 0):.0f} MB"
        + (f"; run dir {out}" if out else "")
    )
