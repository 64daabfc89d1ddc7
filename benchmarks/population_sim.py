"""Population scale on Flower's simulation runtime (issue 19, the "simulation" half of
benchmarks/population.py): the same run as population.py's in-process one (the tiny model on
SST-2's training sentences split IID, ``data.layout = "label_skew"``, K = 10 sampled per round,
3 rounds, at most 6 sentences per sampled client, 1 torch thread, default evaluation: exact up to
100 clients, a seeded sample of 100 beyond with TTP on a pooled test set of 256) over N = 10,
100 and 1,000 virtual SuperNodes (``fedblend deploy sim``: a private Ray on this machine).

Each N runs in its own process (``--one N``); the parent samples the resident memory of that
process and of everything it starts (Ray's GCS and raylet, the worker actors) every 0.5 s.
Per N: build_s (Ray started + every virtual node answered its query, which builds the
federation once per worker), round_s (mean of the 3 rounds; min and max kept), eval_s (the
final evaluation: the final payload to all N nodes, the sampled ones scored), peak_rss_mb (the
peak of the sampled sum of RSS over the process tree; shared library pages count once per
process), driver_peak_rss_mb (the ServerApp's process alone), wall_s (interpreter start to
exit, measured by the parent), run_dir_bytes (the run directory), node_dir_bytes (the virtual
nodes' state directory). The table puts population.json's in-process s / round beside each N.

    PYTHONPATH=src python benchmarks/population_sim.py [--sizes 10 100 1000] [--cpus-per-client 1]

Needs ``pip install -e '.[simulation]'``. Writes ``benchmarks/results/population_sim.json``
(``{"simulation": {"<N>": {...}}, "setting": {...}}``) and ``population_sim.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the in-process benchmark beside this one: its run, data, paths and helpers
from population import BASE, DATA, RESULTS, ROOT, combine, cpu_name, dir_bytes
from population import overrides as inprocess_overrides


def overrides(n: int) -> list[str]:
    """population.py's in-process run at N clients, unchanged: the two engines side by side."""
    return inprocess_overrides(n)


def one(n: int, out: Path, cpus_per_client: float) -> dict:
    """One simulation in this process (the child)."""
    from fedblend.deploy.sim import deploy_sim

    work = out.parent / "work"
    s, res = deploy_sim(BASE, n, overrides(n), out, work=work, cpus_per_client=cpus_per_client)
    engine = json.loads((out / "flower" / "engine.json").read_text())
    rounds = s["time"]["per_round_s"]
    msgs = engine["messages"]
    loads = sum(1 for m in msgs if m.get("backbone_cached") == 0.0)
    return {
        "build_s": res.times["ray_init_s"] + engine["discover_s"],
        "ray_init_s": res.times["ray_init_s"],
        "discover_s": engine["discover_s"],
        "round_s": statistics.mean(rounds),
        "round_s_min": min(rounds),
        "round_s_max": max(rounds),
        "eval_s": s["time"]["eval_s"],
        "serverapp_s": s["time"]["wall_s"],
        "simulation_s": res.times["simulation_s"],
        "ray_stop_s": res.times["ray_stop_s"],
        "actors": res.actors,
        "backbone_loads": loads,
        "messages": len(msgs),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "run_dir_bytes": dir_bytes(out),
        "node_dir_bytes": dir_bytes(work / "nodes"),
        "bytes_up": s["comm"]["bytes_up"],
        "bytes_down": s["comm"]["bytes_down"],
        "generated_instances": s["time"]["generated_instances"],
        "clients_evaluated": s["evaluation"]["clients_evaluated"],
        "eval_mode": s["evaluation"]["mode"],
        "mean_P": s["mean"]["P"],
        "mean_TTP": s["mean"]["TTP"],
    }


def tree_rss(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def measure(n: int, cpus_per_client: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"popsim{n}_") as tmp:
        out = Path(tmp) / "run"
        # Ray starts its workers at niceness 15; at 0 they run as the in-process engine does
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_worker_niceness": "0"}
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--one", str(n), "--out", str(out),
                                 "--cpus-per-client", str(cpus_per_client)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        peak = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                done.wait(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t
        done.set()
        th.join()
        if proc.returncode != 0:
            raise SystemExit(f"N={n}: exit {proc.returncode}\n{stderr[-3000:]}")
        rec = json.loads(stdout.strip().splitlines()[-1])
        rec["wall_s"] = wall
        rec["peak_rss_mb"] = peak[0]
        shutil.rmtree(out, ignore_errors=True)
        return rec



def write(results: dict[str, dict], note: str, cpus_per_client: float) -> None:
    import ray

    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"simulation": results,
           "setting": {"cpu": cpu_name(), "threads": os.cpu_count(), "base": "configs/tiny/fedit.toml",
                       "overrides": [o for o in overrides(0) if "num_clients" not in o and "data.dir" not in o],
                       "cpus_per_client": cpus_per_client, "ray": ray.__version__,
                       "ray_worker_niceness": 0, "note": note}}
    (RESULTS / "population_sim.json").write_text(json.dumps(doc, indent=2) + "\n")
    inproc = _inprocess()
    rows = [("| virtual clients | build s (Ray + discovery) | s / round (min-max) | in-process s / round | eval s | "
             "evaluated | generated | peak RSS MB, tree (driver) | process wall s | run dir | node state | "
             "backbone loads / messages |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        ip = inproc.get(n)
        rows.append(
            f"| {int(n):,} | {r['build_s']:.1f} ({r['ray_init_s']:.1f} + {r['discover_s']:.1f}) | "
            f"{r['round_s']:.2f} ({r['round_s_min']:.2f}-{r['round_s_max']:.2f}) | "
            f"{'-' if ip is None else format(ip['round_s'], '.2f')} | {r['eval_s']:.1f} | "
            f"{r.get('clients_evaluated', '?')} ({r.get('eval_mode', '?')}) | {r['generated_instances']:,} | "
            f"{r['peak_rss_mb']:.0f} ({r['driver_peak_rss_mb']:.0f}) | {r['wall_s']:.1f} | "
            f"{r['run_dir_bytes'] / 1e6:.2f} MB | {r['node_dir_bytes'] / 1e6:.2f} MB | "
            f"{r['backbone_loads']} / {r['messages']} |")
    md = [
        "# Population scale on Flower's simulation runtime",
        "",
        ("`PYTHONPATH=src python benchmarks/population_sim.py`: `fedblend deploy sim` (Flower "
         f"{_flwr_version()}, Ray {ray.__version__}, a private Ray on this machine, "
         f"{cpus_per_client:g} CPU per virtual node: {results[next(iter(results))]['actors']} worker actors) "
         "with the tiny model (`configs/tiny/fedit.toml`) on SST-2's training sentences "
         "(`../shared/data/sst2/train.tsv`) split IID (`data.layout = \"label_skew\"`): population.py's "
         "in-process run unchanged (K = 10 clients per round, 3 rounds, at most 6 sentences per sampled "
         "client, 1 torch thread, 4 test examples per client, default evaluation: exact up to 100 clients, "
         "a seeded sample of 100 beyond with TTP on a pooled test set of 256). Each N in its own process."),
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores. {note}",
        "",
        *rows,
        "",
        ("build s: `ray.init` plus the ServerApp's discovery (every virtual node queried; each worker "
         "builds the federation once); s / round: mean of `time.per_round_s`; in-process s / round: "
         "population.json's, measured by population.py (another run, not alternated with this one); eval s: "
         "the final evaluation (`time.eval_s`: the final payload to all N nodes, the evaluated ones scored; "
         "each node generates for itself, where the in-process engine generates once for clients with the "
         "same model); peak RSS: the sampled peak of the summed RSS of the run's process "
         "tree (driver, Ray's GCS and raylet, the actors; shared pages count once per process), in brackets "
         "the driver (ServerApp) alone; process wall: interpreter start to exit, Ray start and stop "
         "included; backbone loads: messages that loaded the backbone (the rest reused their worker's)."),
        "",
    ]
    (RESULTS / "population_sim.md").write_text("\n".join(md))


def _inprocess() -> dict[str, dict]:
    path = RESULTS / "population.json"
    return json.loads(path.read_text()).get("inprocess", {}) if path.is_file() else {}


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", type=int, help="(internal) run one N in this process and print its JSON")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--keep", action="store_true", help="keep the other sizes already in the JSON")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.out, args.cpus_per_client)))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: SST-2 not found")
    results: dict[str, dict] = {}
    path = RESULTS / "population_sim.json"
    if args.keep and path.is_file():  # add to the sizes measured before
        results.update(json.loads(path.read_text())["simulation"])
    for n in args.sizes:
        reps = [measure(n, args.cpus_per_client) for _ in range(args.repeat)]
        results[str(n)] = combine(reps)
        r = results[str(n)]
        print(f"N={n:>5}: build {r['build_s']:.1f} s, round {r['round_s']:.2f} s, eval {r['eval_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (driver {r['driver_peak_rss_mb']:.0f}), wall {r['wall_s']:.1f} s, "
              f"run dir {r['run_dir_bytes'] / 1e6:.2f} MB", flush=True)
        results = dict(sorted(results.items(), key=lambda kv: int(kv[0])))
        write(results, args.note, args.cpus_per_client)  # after each N: a long run keeps what it has


if __name__ == "__main__":
    main()
