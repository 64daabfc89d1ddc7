"""Soak: a long loopback Flower run of the tiny FedDPA-T config under repeated faults.

One SuperLink and 4 SuperNodes (TLS + SuperNode authentication, so that a restarted SuperNode
comes back under its node id), ``engine.round_timeout`` set, ``R`` rounds. In 10% of the rounds
a random SuperNode (1..3; node 0 lives the whole run, so one SuperNode's memory is followed
from round 10 to round R) is SIGKILLed mid-round with everything it started and restarted on
the same state directory; twice the ServerApp is SIGKILLed mid-round and the run is submitted
again with ``resume``. Recorded: every round of ``metrics.jsonl`` with its sampled / answered /
dropped clients, RSS and open descriptors of the SuperLink, its SuperExec, the ServerApp and
every SuperNode and its SuperExec every 10 rounds, the nodes' state on disk, and the processes
left after the deployment is stopped.

A SIGKILLed SuperNode cannot come back at once: the SuperLink refuses to activate its node id
until two 30 s heartbeats have lapsed (flower-supernode exits with code 305), so the soak
starts it again every 5 s until it stays up.

``--between-rounds``: the kills fall between rounds only: twice the ServerApp right after a
checkpoint, each time with two SuperNodes (1..3), and the run is resumed once they are back;
the result is compared with the same config run in-process, which a Flower run equals
(tests/flower/test_trust.py): ``equal_to_undisturbed``.

    python benchmarks/soak.py --rounds 200 --out benchmarks/results/soak_200.json
    python benchmarks/soak.py --rounds 12 --between-rounds --out benchmarks/results/soak_between.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from fedblend.deploy.soak import Soak, compare_inprocess, cpu_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "feddpa_t.toml"


KEYS = ("rounds", "rounds_logged", "rounds_contiguous", "server_kills", "node_kills", "rounds_with_drops",
        "every_round_accounts_for_its_clients", "rss_growth", "fd_growth", "node_disk_bytes", "processes_left",
        "equal_to_undisturbed", "run_status", "wall_s")


def render(res: dict) -> str:
    """The markdown tables of one soak's JSON (as in benchmarks/results/soak.md)."""
    out = ["| key | value |", "|---|---|"]
    out += [f"| {k} | {res[k]} |" for k in KEYS if k in res]
    out += ["", "| process | same process | RSS MB (r10 -> rR) | fds (r10 -> rR) |", "|---|---|---|---|"]
    for role, g in sorted(res["growth"].items()):
        (a, b), (fa, fb) = g["rss_mb"], g["fds"]
        out.append(f"| {role} | {g['same_process']} | {a:.0f} -> {b:.0f} ({g['rss_ratio']:.3f}) | "
                   f"{fa} -> {fb} ({g['fd_ratio']:.2f}) |")
    roles = sorted({r for s in res["samples"] for r in s["procs"]})
    long_lived = [r for r in roles if res["growth"].get(r, {}).get("same_process")]
    out += ["", ("Every 10 rounds: the nodes' state on disk, and RSS MB / open descriptors of the processes "
            "that lived from round 10 to the end:"), "",
            "| round | node state bytes | snapshots (all nodes) | " + " | ".join(long_lived) + " |",
            "|---|---|---|" + "---|" * len(long_lived)]
    for smp in res["samples"]:
        cells = []
        for r in long_lived:
            p = smp["procs"].get(r)
            cells.append(f"{p['rss_mb']:.0f} / {p['fds']}" if p else "-")
        out.append(f"| {smp['round']} | {smp['node_disk_bytes']} | {smp['snapshots']} | " + " | ".join(cells) + " |")
    out.append("")
    for e in res["events"]:
        if e["kind"] == "server_kill":
            out.append(f"- round {e['round']}: ServerApp SIGKILLed (checkpoint held {e['checkpointed']} rounds); resumed")
        elif e["kind"] == "node_kill":
            back = f"back after {e['back_after_s']:.0f} s" if "back_after_s" in e else "not back by the end"
            out.append(f"- round {e['round']}: SuperNode {e['node']} SIGKILLed; started {e['starts']} time(s), {back}")
        else:
            out.append(f"- round {e['round']}: {e['kind']} ({e.get('why', '')})")
    drops = [f"{r['round']}: " + ", ".join(f"{c} ({w[:40]})" for c, w in r["dropped"].items())
             for r in res["per_round"] if r["dropped"]]
    out += ["", f"rounds with drops ({len(drops)}): " + "; ".join(drops), "", f"host: {res.get('host')}", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True, help="the JSON results file")
    ap.add_argument("--work", type=Path, default=None, help="deployment and run directory (default: next to --out)")
    ap.add_argument("--round-timeout", type=float, default=45.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--between-rounds", action="store_true")
    ap.add_argument("--deadline-s", type=float, default=4 * 3600)
    ap.add_argument("--render", action="store_true", help="print the markdown tables of --out (no run)")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.out.read_text())))
        return 0
    from fedblend.deploy.local import QUIET_ENV

    os.environ.update(QUIET_ENV)
    work = (args.work or args.out.parent / f".soak-{args.out.stem}").resolve()
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    soak = Soak(work / "deploy", work / "run", args.rounds, args.round_timeout, args.seed, args.between_rounds,
                config=CONFIG)
    try:
        res = soak.run(args.deadline_s)
    finally:
        soak.dep.stop()
    if args.between_rounds:
        cmp = compare_inprocess(soak, work / "inprocess")
        res["compare_inprocess"] = cmp
        res["equal_to_undisturbed"] = (cmp["scores_equal"] and cmp["bytes_equal"]
                                       and cmp["adapter_max_abs_diff"] <= 1e-5)
        res["every_round_answered_by_all"] = all(not r["dropped"] for r in res["per_round"])
    import platform

    res["host"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                   "load_avg_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    keys = ("rounds", "rounds_logged", "rounds_contiguous", "server_kills", "node_kills", "rss_growth",
            "fd_growth", "node_disk_bytes", "processes_left", "equal_to_undisturbed", "wall_s")
    print(json.dumps({k: res.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
