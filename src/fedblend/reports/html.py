"""HTML reports with matplotlib plots, built only from what a run recorded."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedblend.console import fmt_bytes
from fedblend.errors import FedblendError
from fedblend.store.files import atomic_write
from fedblend.store.rundir import RunDir


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # legends placed beside the axes stay in
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(title: str, b64: str) -> str:
    return f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'


def fmt_seconds(s: float | None) -> str:
    """Seconds as a person reads them: ``42.8014`` -> ``43 s``, ``7.31`` -> ``7.3 s``,
    ``725`` -> ``12.1 min``."""
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 10 else (f"{s:.0f} s" if s < 600 else f"{s / 60:.1f} min")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}figure{display:inline-block;margin:0.5em}img{max-width:520px}
code{background:#f3f3f3;padding:1px 4px}"""


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def _loss_plot(rounds: list[dict[str, Any]]) -> str | None:
    pts = [(r["round"] + 1, r["loss"]) for r in rounds if r.get("loss") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("mean client training loss")
    return _png(fig)


def _bytes_plot(rounds: list[dict[str, Any]]) -> str | None:
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["round"] + 1 for r in rounds]
    ax.bar([v - 0.2 for v in x], [r["bytes_up"] / 1e6 for r in rounds], width=0.4, label="up")
    ax.bar([v + 0.2 for v in x], [r["bytes_down"] / 1e6 for r in rounds], width=0.4, label="down")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.legend()
    return _png(fig)


def _pttp_plot(clients: dict[str, Any], metric: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ids = list(clients)
    x = range(len(ids))
    ax.bar([i - 0.2 for i in x], [clients[c]["P"] for c in ids], width=0.4, label="P")
    ax.bar([i + 0.2 for i in x], [clients[c]["TTP"] for c in ids], width=0.4, label="TTP")
    ax.set_xticks(list(x), [f"{c}\n{clients[c]['task'][:12]}" for c in ids], fontsize=7)
    ax.set_ylabel(metric)
    ax.legend()
    return _png(fig)


READABLE = 30
"""Most clients (bars, heatmap rows) or tasks (heatmap columns) a plot can label legibly; past
it the report shows distributions."""


def _heatmap(clients: dict[str, Any], metric: str) -> str | None:
    tasks = list(next(iter(clients.values())).get("by_task", {}))
    if len(tasks) < 2 or len(clients) > READABLE or len(tasks) > READABLE:
        return None
    if any(list(c.get("by_task", {})) != tasks for c in clients.values()):
        return None  # sampled tasks differ from client to client: no grid
    ids = list(clients)
    grid = [[clients[c]["by_task"].get(t, float("nan")) for t in tasks] for c in ids]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), [t[:14] for t in tasks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(ids)), [f"client {c}" for c in ids], fontsize=7)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title("client model (rows) on task test set (columns)", fontsize=8)
    return _png(fig)


def _histogram_plot(s: dict[str, Any]) -> str | None:
    """Per-client P and TTP of a run with many clients, as histograms (summary.evaluation)."""
    dist = (s.get("evaluation") or {}).get("distribution") or {}
    if len(s.get("clients") or {}) <= READABLE or not dist.get("P"):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, colour in (("P", "tab:blue"), ("TTP", "tab:orange")):
        h = (dist.get(key) or {}).get("histogram")
        if h:
            edges = h["edges"]
            ax.stairs(h["counts"], edges, label=key, color=colour, fill=key == "P", alpha=0.5 if key == "P" else 1)
    ax.set_xlabel(s.get("metric", "score"))
    ax.set_ylabel("clients")
    ax.legend()
    return _png(fig)


def _p_rounds_plot(s: dict[str, Any]) -> str | None:
    """``eval.every``: the global adapter's P on the evaluated clients, every k rounds."""
    hist = s.get("p_per_round")
    if not hist:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["round"] for r in hist]
    ax.plot(x, [r["P"] for r in hist], marker="o")
    if all("lo" in r for r in hist):
        ax.fill_between(x, [r["lo"] for r in hist], [r["hi"] for r in hist], alpha=0.25, label="95% interval")
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel(f"global adapter P ({s.get('metric', '')})")
    return _png(fig)


def _distribution_table(s: dict[str, Any]) -> str:
    ev = s.get("evaluation") or {}
    dist = ev.get("distribution") or {}
    qs = ["0", "0.1", "0.25", "0.5", "0.75", "0.9", "1"]
    rows = []
    for key in ("P", "TTP"):
        ci = ev.get(key)
        q = (dist.get(key) or {}).get("quantiles", {})
        rows.append([key, s["mean"][key], f"{ci['lo']:.4f} .. {ci['hi']:.4f}" if ci else "exact",
                     *[q.get(k, float("nan")) for k in qs]])
    sizes = {k: ev[k] for k in ("mode", "clients", "clients_evaluated", "tasks", "ttp",
                                "ttp_other_tasks_per_client", "pooled_test_instances") if k in ev}
    return (_table(["", "mean", "95% interval", *[f"q{k}" for k in qs]], rows)
            + _table(list(sizes), [list(sizes.values())]))


def _weights_plot(path: Path) -> str | None:
    pred = path / "eval" / "predictions.jsonl"
    if not pred.is_file():
        return None
    own, other = [], []
    for line in pred.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "weight" in rec:
            (own if rec["own_task"] else other).append(rec["weight"])
    if not own and not other:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = 30
    if own:
        ax.hist(own, bins=bins, alpha=0.6, label=f"own task (n={len(own)})", density=True)
    if other:
        ax.hist(other, bins=bins, alpha=0.6, label=f"other tasks (n={len(other)})", density=True)
    ax.set_xlabel("instance weight")
    ax.set_ylabel("density")
    ax.legend()
    return _png(fig)


def _per_class_plot(s: dict[str, Any]) -> str | None:
    """Vision runs: accuracy per class (global balanced test set), head/tail classes marked."""
    accs = s.get("per_class_accuracy")
    if not accs:
        return None
    names = s.get("class_names") or [str(i) for i in range(len(accs))]
    groups = s.get("class_groups", {})
    colour = {c: col for g, col in (("head", "tab:blue"), ("medium", "tab:gray"), ("tail", "tab:red"))
              for c in groups.get(g, [])}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(accs)), [a if a is not None else 0.0 for a in accs],
           color=[colour.get(i, "tab:gray") for i in range(len(accs))])
    ax.set_xticks(range(len(accs)), [n[:10] for n in names], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("per class (blue head, red tail)", fontsize=8)
    return _png(fig)


def _accuracy_rounds_plot(s: dict[str, Any]) -> str | None:
    hist = s.get("accuracy_per_round")
    if not hist:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(hist) + 1), hist, marker="o")
    target = s.get("rounds_to_target", {}).get("target")
    if target:
        ax.axhline(target, ls="--", color="gray", lw=1)
    ax.set_xlabel("round")
    ax.set_ylabel("global-model test accuracy")
    return _png(fig)


def write_report(path: str | Path, summary: dict[str, Any] | None = None) -> Path:
    """Render ``DIR/report.html`` from a completed run directory, or from ``summary`` before
    it is written (a run writes its report first and summary.json last, which marks it
    complete: a run killed between the two is resumed, not left complete without a report)."""
    run = RunDir(path)
    if summary is None and not run.complete:
        raise FedblendError(f"{run.path}: no summary.json (the run did not complete)")
    s = json.loads(json.dumps(summary)) if summary is not None else run.summary()  # as read back
    rounds = run.rounds()
    parts = [(f"<p>algorithm <code>{html.escape(s['algorithm'])}</code>, {s['rounds']} rounds, "
              f"seed {s['seed']}, metric <code>{html.escape(s.get('metric', ''))}</code></p>")]
    if "clients" in s and len(s["clients"]) > READABLE and "P" in next(iter(s["clients"].values())):
        parts.append("<h2>Scores</h2>" + _distribution_table(s))
    elif "clients" in s and s["clients"] and "P" in next(iter(s["clients"].values())):
        rows = [[c, v["task"], v["P"], v["TTP"]] for c, v in s["clients"].items()]
        rows.append(["mean", "", s["mean"]["P"], s["mean"]["TTP"]])
        parts.append("<h2>Scores</h2>" + _table(["client", "task", "P", "TTP"], rows))
    comm, t, mem = s.get("comm", {}), s.get("time", {}), s.get("memory", {})
    parts.append("<h2>Cost</h2>" + _table(
        ["bytes up", "bytes down", "wall", "training", "evaluation", "peak RSS"],
        [[fmt_bytes(comm.get("bytes_up", 0)), fmt_bytes(comm.get("bytes_down", 0)),
          fmt_seconds(t.get("wall_s")), fmt_seconds(t.get("train_s")), fmt_seconds(t.get("eval_s")),
          f"{mem.get('peak_rss_mb', 0.0):.0f} MB"]],
    ))
    if "accuracy" in s:
        acc = {k: v for k, v in s["accuracy"].items() if k not in ("per_client", "reference")}
        ref = s["accuracy"].get("reference") or {}  # vision: centralized reference rows
        acc.update({f"ref {n}": ref.get(k) for k, n in (("linear_probe", "probe"), ("centralized_adapter", "adapter")) if ref})
        parts.append("<h2>Accuracy</h2>" + _table(
            list(acc), [[v if v is not None else "n/a" for v in acc.values()]],
        ))
    figs = []
    for title, b64 in (
        ("training loss per round", _loss_plot(rounds)),
        ("bytes per round", _bytes_plot(rounds)),
        ("P and TTP per client", _pttp_plot(s["clients"], s["metric"]) if s.get("clients") and len(s["clients"]) <= READABLE and "P" in next(iter(s["clients"].values()), {}) else None),
        ("per-client P and TTP", _histogram_plot(s)),
        ("global adapter P on the evaluated clients, every k rounds", _p_rounds_plot(s)),
        ("client-by-task scores", _heatmap(s["clients"], s["metric"]) if s.get("clients") and "by_task" in next(iter(s["clients"].values()), {}) else None),
        ("instance weights: own vs other tasks", _weights_plot(run.path)),
        ("accuracy per class", _per_class_plot(s)),
        ("accuracy per round", _accuracy_rounds_plot(s)),
    ):
        if b64:
            figs.append(_img(title, b64))
    parts.append("<h2>Plots</h2>" + "".join(figs))
    out = run.path / "report.html"
    atomic_write(out, _page(f"fedblend run: {s.get('name', run.path.name)}", parts))
    return out
