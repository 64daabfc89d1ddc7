"""Population scale (issue 19): the tiny model on SST-2's training sentences split IID
(``data.layout = "label_skew"``, ``data.partitioner = "iid"``) over N = 10, 100, 1,000 and
10,000 clients, K = 10 sampled per round, 3 rounds, default evaluation (exact up to
``eval.exact_max_clients`` = 100 clients, a seeded sample of 100 beyond), in-process.

Each N runs in its own process (``--one N``), so each peak RSS is its own. Per N: seconds to
build the federation (read + partition), seconds per round (mean of the 3; min and max kept),
evaluation seconds, the process's peak RSS, the process's wall time (interpreter start to
exit, measured by the parent) and the bytes of the run directory.

    PYTHONPATH=src python benchmarks/population.py [--sizes 10 100 1000 10000] [--repeat 1]

Writes ``benchmarks/results/population.json`` (``{"inprocess": {"<N>": {...}}, "simulation":
{...}}``; an existing ``simulation`` section is kept) and ``population.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (a worktree one level deeper: two levels up)
DATA = next((p / "shared" / "data" / "sst2" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data" / "sst2").is_dir()), ROOT.parent / "shared" / "data" / "sst2")
BASE = ROOT / "configs" / "tiny" / "fedit.toml"
SMOLLM2 = ROOT / "configs" / "sst2" / "feddpa_f_n100.toml"  # --smollm2: the real-model run
RESULTS = ROOT / "benchmarks" / "results"


def overrides(n: int, cap: int = 6, threads: int = 1) -> list[str]:
    """The run at N clients; ``cap``: sentences each sampled client trains on (0 = all it holds),
    ``threads``: torch threads (0 = torch's default)."""
    return [f"data.max_train_per_client={cap}", f"engine.threads={threads}",
        'model.source="tiny"', 'data.kind="tsv"', f'data.dir="{DATA}"', 'data.layout="label_skew"',
        'data.partitioner="iid"', f"data.num_clients={n}", 'data.train_file="train.tsv"',
        'data.test_file="test.tsv"', 'data.label_names=["negative","positive"]',
        "train.clients_per_round=10", "train.rounds=3", "eval.max_per_task=4", "engine.progress=false",
    ]


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size
    return total


def one(n: int, out: Path, cap: int, threads: int) -> dict:
    """One run in this process (the child)."""
    from fedblend.config import load_config
    from fedblend.runner import run_experiment

    cfg = load_config(BASE, overrides(n, cap, threads))
    t = time.perf_counter()
    s = run_experiment(cfg, out)
    run_s = time.perf_counter() - t
    rounds = s["time"]["per_round_s"]
    return {
        "build_s": s["time"]["build_s"],
        "round_s": statistics.mean(rounds),
        "round_s_min": min(rounds),
        "round_s_max": max(rounds),
        "eval_s": s["time"]["eval_s"],
        "load_s": s["time"]["load_s"],
        "finish_s": s["time"]["finish_s"],
        "run_s": run_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "run_dir_bytes": dir_bytes(out),
        "clients_evaluated": s["evaluation"]["clients_evaluated"],
        "eval_mode": s["evaluation"]["mode"],
        "eval_instances": s["time"]["eval_instances"],
        "generated_instances": s["time"]["generated_instances"],
        "train_examples": sum(s["data"]["train_examples"].values()) if "n" not in s["data"]["train_examples"]
        else s["data"]["train_examples"]["total"],
        "mean_P": s["mean"]["P"],
        "mean_TTP": s["mean"]["TTP"],
    }


def measure(n: int, cap: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"pop{n}_") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--out", str(out),
                               "--cap", str(cap), "--threads", str(threads)],
                              check=False, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"N={n}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["wall_s"] = wall
        shutil.rmtree(out, ignore_errors=True)
        return rec


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


KEYS = ("build_s", "round_s", "eval_s", "peak_rss_mb", "wall_s", "run_dir_bytes")


def combine(reps: list[dict]) -> dict:
    """One record: the median of each number over the repeats, with min and max kept."""
    out = dict(reps[-1])
    for k in KEYS:
        vals = [r[k] for r in reps]
        out[k] = statistics.median(vals)
        if len(vals) > 1:
            out[f"{k}_range"] = [min(vals), max(vals)]
    out["repeats"] = len(reps)
    return out


def write(results: dict[str, dict], note: str, cap: int, threads: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "population.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    # the simulation runtime's figures come from benchmarks/population_sim.py (its own JSON)
    sim_path = RESULTS / "population_sim.json"
    sim = json.loads(sim_path.read_text()).get("simulation", {}) if sim_path.is_file() else old.get("simulation", {})
    doc = {"inprocess": results, "simulation": sim, **({"smollm2": old["smollm2"]} if "smollm2" in old else {}),
           "setting": {"cpu": cpu_name(), "threads": os.cpu_count(), "base": "configs/tiny/fedit.toml",
                       "overrides": [o for o in overrides(0, cap, threads) if "num_clients" not in o], "note": note}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    rows = [("| clients | build s | s / round (min-max) | eval s | peak RSS MB | process wall s | run dir | "
            "evaluated | generated |"), "|---|---|---|---|---|---|---|---|---|"]
    reps = max(int(r.get("repeats", 1)) for r in results.values())

    def cell(r: dict, k: str, fmt: str) -> str:
        """The value (the median over the repeats), and its min-max over the repeats; with one
        run, a round's mean and the min-max over its rounds."""
        lo, hi = r.get(f"{k}_range") or ((r["round_s_min"], r["round_s_max"]) if k == "round_s" else (None, None))
        return format(r[k], fmt) + ("" if lo is None else f" ({format(lo, fmt)}-{format(hi, fmt)})")

    for n, r in results.items():
        rows.append(
            f"| {int(n):,} | {cell(r, 'build_s', '.2f')} | {cell(r, 'round_s', '.2f')} | {cell(r, 'eval_s', '.2f')} | "
            f"{cell(r, 'peak_rss_mb', '.0f')} | {cell(r, 'wall_s', '.1f')} | {r['run_dir_bytes'] / 1e6:.2f} MB | "
            f"{r['clients_evaluated']} ({r['eval_mode']}) | {r['generated_instances']:,} |")
    md = [
        "# Population scale: clients registered vs cost per round (in-process)",
        "",
        ("`PYTHONPATH=src python benchmarks/population.py`: the tiny model (`configs/tiny/fedit.toml`, "
        "`model.source = \"tiny\"`) on SST-2's training sentences (`../shared/data/sst2/train.tsv`), split IID "
        "(`data.layout = \"label_skew\"`, `data.partitioner = \"iid\"`), K = 10 clients per round, 3 rounds, "
        "4 test examples per client, default evaluation (exact up to 100 clients, a seeded sample of 100 "
        "beyond, TTP on a pooled test set of 256). Each N in its own process."),
        "",
        (f"Each sampled client trains on at most {cap or 'all'} of its sentences (`data.max_train_per_client`): "
         "at N = 10,000 a client holds about 6, at N = 10 about 6,000, so without the cap a round's work "
         "is the data volume (1,000x between the two), not the population's overhead this measures. "
         f"Torch threads: {threads or 'default'} (`engine.threads`)."),
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores. {note}",
        "",
        *rows,
        "",
        ("build s: reading the TSV and partitioning it (`time.build_s`); s / round: mean of the 3 rounds "
        "(`time.per_round_s`); eval s: `time.eval_s`; peak RSS: the run's process at its end; process wall: "
        "interpreter start to exit (imports, model build, run, report), measured by the parent; run dir: "
        "bytes of every file in the run directory."),
        "",
        (f"{reps} runs of each N, each in a fresh process: each figure is the median over the runs, in brackets "
         "the min-max over the runs."
         if reps > 1 else "One run of each N: s / round's brackets are the min-max over its 3 rounds."),
        "",
    ]
    md += targets(results)
    (RESULTS / "population.md").write_text("\n".join(md))


def targets(results: dict[str, dict]) -> list[str]:
    """Issue 19's targets, computed from the table (those whose sizes were measured)."""
    r = {int(n): v for n, v in results.items()}
    out = []
    if 100 in r and 10000 in r:
        a, b = r[100], r[10000]
        out += [f"- s / round at N = 10,000 vs N = 100: {b['round_s'] / a['round_s']:.2f}x (target at most 1.2x)",
                f"- peak RSS at N = 10,000 vs N = 100: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x (target at most 1.2x)"]
    if 10000 in r:
        b = r[10000]
        out += [f"- federation built at N = 10,000 in {b['build_s']:.2f} s (target under 10 s)",
                (f"- the whole run at N = 10,000 in {b['wall_s']:.1f} s of process wall (target under 120 s), "
                f"its run directory {b['run_dir_bytes'] / 1e6:.2f} MB (target under 50 MB)")]
    if 1000 in r:
        b = r[1000]
        out += [(f"- N = 1,000: {b['wall_s']:.1f} s of process wall, peak RSS {b['peak_rss_mb']:.0f} MB "
                "(target under 60 s and 2 GB)")]
    return ["## The targets (computed from the table)", "", *out, ""] if out else []


def smollm2(note: str, keep: Path | None, source: Path | None = None) -> None:
    """The real-model run: ``fedblend run configs/sst2/feddpa_f_n100.toml`` as a user types it
    (FedDPA-F, SmolLM2-135M-Instruct, N = 100, K = 10, label-skew SST-2), then
    ``fedblend evaluate --sweep feddpa.weighting=global,local`` on the same trained adapters: what
    the instance-wise blend gives beside either adapter alone, on the same clients and test sets.
    Figures come from the runs' summary.json; written to population.json's ``smollm2`` and
    population_smollm2.md. ``source``: a completed run of that config to record instead of
    training one (its process wall and terminal output are then unknown)."""
    cli = [sys.executable, "-c", "from fedblend.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tmp = Path(tempfile.mkdtemp(prefix="pop_smollm2_"))
    out = source or keep or tmp / "run"
    try:
        wall, terminal = None, None
        if source is None:
            t = time.perf_counter()
            proc = subprocess.run([*cli, "run", str(SMOLLM2.relative_to(ROOT)), "--out", str(out)], cwd=ROOT,
                                  env=env, check=False, capture_output=True, text=True)
            wall, terminal = time.perf_counter() - t, proc.stdout
            if proc.returncode != 0:
                raise SystemExit(f"{SMOLLM2.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        s = json.loads((out / "summary.json").read_text())
        proc2 = subprocess.run([*cli, "evaluate", str(out), "--out", str(tmp / "sweep"), "--sweep",
                                "feddpa.weighting=global,local"], cwd=ROOT, env=env, check=False,
                               capture_output=True, text=True)
        if proc2.returncode != 0:
            raise SystemExit(f"evaluate --sweep: exit {proc2.returncode}\n{proc2.stderr[-3000:]}")
        sweep = json.loads((tmp / "sweep" / "sweep.json").read_text())
        rows = {}
        for row in sweep["rows"]:
            sub = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
            rows[row["label"].split("=", 1)[1]] = {"P": sub["evaluation"]["P"], "TTP": sub["evaluation"]["TTP"],
                                                   "eval_s": sub["time"]["eval_s"]}
        ev = s["evaluation"]
        cfg = json.loads((out / "config.json").read_text())  # the run's resolved config
        rec = {
            "config": str(SMOLLM2.relative_to(ROOT)), "algorithm": s["algorithm"], "weighting": s.get("weighting"),
            "clients": ev["clients"], "rounds": s["rounds"], "metric": s["metric"], "setting": setting_of(cfg),
            "evaluation": {k: ev[k] for k in ("mode", "clients_evaluated", "ttp", "pooled_test_instances")},
            "P": ev["P"], "TTP": ev["TTP"], "interval": ev["interval"],
            "per_client": {c: {"P": v["P"], "TTP": v["TTP"]} for c, v in s["clients"].items()},
            "weightings": rows, "instance_weights": s["instance_weights"],
            "time": {k: s["time"][k] for k in ("build_s", "load_s", "train_s", "finish_s", "eval_s", "wall_s")},
            "per_round_s": s["time"]["per_round_s"], "process_wall_s": wall,
            "peak_rss_mb": s["memory"]["peak_rss_mb"], "run_dir_bytes": dir_bytes(out),
            "bytes_up": s["comm"]["bytes_up"], "bytes_down": s["comm"]["bytes_down"],
            "loss_per_round": [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())],
            "terminal": terminal, "recorded_from": str(source) if source else None, "cpu": cpu_name(), "note": note,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = RESULTS / "population.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["smollm2"] = rec
    path.write_text(json.dumps(doc, indent=2) + "\n")
    write_smollm2(rec)


def setting_of(cfg: dict) -> dict:
    """The settings population_smollm2.md names, from a run's resolved config."""
    return {"clients_per_round": cfg["train"]["clients_per_round"], "dirichlet_alpha": cfg["data"]["dirichlet_alpha"],
            "max_train_per_client": cfg["data"]["max_train_per_client"], "max_per_task": cfg["eval"]["max_per_task"]}


def write_smollm2(r: dict) -> None:
    def ci(e: dict) -> str:
        return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"

    t = r["time"]
    w = r["weightings"]
    wt = r["weighting"] or {}
    iw = r["instance_weights"] or {}
    st = r["setting"]
    n_ev = r["evaluation"]["clients_evaluated"]
    md = [
        "# Population scale with a real model: FedDPA-F, SmolLM2-135M-Instruct, 100 clients",
        "",
        (f"`PYTHONPATH=src python benchmarks/population.py --smollm2`: `fedblend run {r['config']}` (its header "
         f"says every setting and why): SST-2's training sentences split over {r['clients']} clients by a "
         f"Dirichlet({st['dirichlet_alpha']:g}) draw over the labels (most clients hold mostly one sentiment), "
         f"K = {st['clients_per_round']} sampled per round, {r['rounds']} rounds, each sampled client training on "
         f"at most {st['max_train_per_client']} of its sentences; FedDPA-F then fine-tunes "
         "every client's local adapter. Evaluation: a seeded sample of "
         f"{n_ev} of {r['clients']} clients, {st['max_per_task']} of its own test sentences each (P), "
         f"and one pooled test set of {r['evaluation']['pooled_test_instances']} sentences drawn over all clients "
         f"(TTP); {r['metric']} of the one-word answer; 95% intervals: {r['interval']}."),
        "",
        f"CPU: {r['cpu']}. {r['note']}",
        "",
        "| | P | TTP |",
        "|---|---|---|",
        f"| FedDPA-F, `feddpa.weighting={wt.get('mode', wt)}` (the run) | {ci(r['P'])} | {ci(r['TTP'])} |",
        *(f"| the same adapters, `feddpa.weighting={k}` | {ci(v['P'])} | {ci(v['TTP'])} |" for k, v in w.items()),
        "",
        ("Same trained adapters, same evaluated clients and test sets in every row (`fedblend evaluate "
         f"--sweep`); the intervals are over the {n_ev} evaluated clients, so rows share their sampling error "
         "and differ by less than their intervals suggest. One seed: no interval over training seeds."),
        "",
        "| key | value |",
        "|---|---|",
        f"| loss per round (mean over the sampled clients) | {', '.join(f'{x:.3f}' for x in r['loss_per_round'])} |",
        f"| build the federation (read + Dirichlet partition) | {t['build_s']:.1f} s |",
        f"| s / round (K = {st['clients_per_round']}) | {', '.join(f'{x:.1f}' for x in r['per_round_s'])} |",
        f"| train (all rounds) | {t['train_s']:.0f} s |",
        f"| FedDPA-F fine-tuning of the {r['clients']} local adapters | {t['finish_s']:.0f} s |",
        f"| evaluation ({r['evaluation']['clients_evaluated']} clients) | {t['eval_s']:.0f} s |",
        (f"| run wall (summary) / process wall | {t['wall_s']:.0f} s / "
        f"{'not measured' if r['process_wall_s'] is None else format(r['process_wall_s'], '.0f') + ' s'} |"),
        f"| peak RSS | {r['peak_rss_mb']:.0f} MB |",
        f"| sent up / down | {r['bytes_up'] / 1e6:.1f} MB / {r['bytes_down'] / 1e6:.1f} MB |",
        f"| run directory | {r['run_dir_bytes'] / 1e6:.1f} MB |",
        *([(f"| instance weight on the local adapter, own / pooled test inputs | "
            f"{iw['own_task']['mean']:.3f} / {iw['other_tasks']['mean']:.3f} |")] if iw.get("own_task") else []),
        "",
        "Per evaluated client:",
        "",
        "| client | P | TTP |",
        "|---|---|---|",
        *(f"| {c} | {v['P']:.3f} | {v['TTP']:.3f} |" for c, v in r["per_client"].items()),
        "",
    ]
    if r["terminal"]:
        md += ["What `fedblend run` printed:", "", "```", r["terminal"].rstrip(), "```", ""]
    else:
        md += [(f"Recorded from a finished `fedblend run {r['config']} --out {r['recorded_from']}` (`--from`): "
                "the benchmark ran the sweep, not the training."), ""]
    (RESULTS / "population_smollm2.md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", type=int, help="(internal) run one N in this process and print its JSON")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--cap", type=int, default=6, help="data.max_train_per_client (0 = all the client holds)")
    ap.add_argument("--threads", type=int, default=1, help="engine.threads (0 = torch's default)")
    ap.add_argument("--render", action="store_true", help="write population.md again from population.json")
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2 FedDPA-F run at N = 100 instead (~20 min)")
    ap.add_argument("--keep", type=Path, help="--smollm2: keep its run directory here")
    ap.add_argument("--from", dest="source", type=Path,
                    help="--smollm2: record this finished run of the config instead of training one")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.out, args.cap, args.threads)))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: SST-2 not found")
    if args.render:  # the markdown again from population.json (no run)
        doc = json.loads((RESULTS / "population.json").read_text())
        write(doc["inprocess"], doc["setting"]["note"], args.cap, args.threads)
        if "smollm2" in doc:
            write_smollm2(doc["smollm2"])
        return
    if args.smollm2:
        smollm2(args.note, args.keep, args.source)
        return
    results: dict[str, dict] = {}
    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    for _ in range(args.repeat):  # the sizes in turn, so a slow spell of the machine hits each alike
        for n in args.sizes:
            runs[n].append(measure(n, args.cap, args.threads))
    for n in args.sizes:
        results[str(n)] = combine(runs[n])
        r = results[str(n)]
        print(f"N={n:>6}: build {r['build_s']:.2f} s, round {r['round_s']:.2f} s, eval {r['eval_s']:.2f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.1f} s, run dir {r['run_dir_bytes'] / 1e6:.2f} MB",
              flush=True)
    write(results, args.note, args.cap, args.threads)


if __name__ == "__main__":
    main()
