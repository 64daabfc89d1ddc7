"""Soak: a long loopback Flower run of a tiny config under repeated faults (issue 23).

One SuperLink and ``nodes`` SuperNodes (TLS + SuperNode authentication, so that a restarted
SuperNode comes back under its node id), ``engine.round_timeout`` set, ``R`` rounds. In the
planned rounds a random SuperNode (1..nodes-1; node 0 lives the whole run, so one SuperNode's
memory is followed from round 10 to round R) is SIGKILLed mid-round with everything it started
and restarted on the same state directory; in others the ServerApp is SIGKILLed mid-round and
the run is submitted again with ``resume``. Recorded: every round of ``metrics.jsonl`` with its
sampled / answered / dropped clients, RSS and open descriptors of the SuperLink, its SuperExec,
the ServerApp and every SuperNode and its SuperExec every 10 rounds, the nodes' state on disk,
and the processes left after the deployment is stopped.

A SIGKILLed SuperNode cannot come back at once: the SuperLink refuses to activate its node id
until two 30 s heartbeats have lapsed (flower-supernode exits with code 305), so the soak
starts it again every 5 s until it stays up.

``between=True``: the kills fall between rounds only: the ServerApp right after a checkpoint,
each time with two SuperNodes (1..nodes-1), and the run is resumed once they are back; such a
run ends with the undisturbed run's result (:func:`compare_inprocess`).

Used by ``benchmarks/soak.py`` (200 rounds, results in benchmarks/results/soak.md) and by the
CI-sized soak test (tests/flower/test_soak.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from fedblend.errors import FedblendError

NODES = 4


def overrides(rounds: int, timeout: float, nodes: int = NODES) -> list[str]:
    return [f"train.rounds={rounds}", f"engine.round_timeout={timeout:g}", "engine.checkpoint_every=1",
            f"data.num_clients={nodes}", "data.synthetic_train_per_client=8", "data.synthetic_test_per_task=2",
            "eval.max_new_tokens=4", "engine.threads=1", "engine.progress=false"]


def _cmd(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Soak:
    """A soak on a fresh loopback deployment in ``work``, the run directory ``out``.

    The kill plan, seeded by ``seed``: ``node_kills`` SuperNode kills (default: 10% of the
    rounds) in rounds drawn from 1..R-1, ``server_kills`` ServerApp kills in rounds drawn from
    R/5..R-1; ``node_rounds`` (rounds, or round -> node or tuple of nodes) / ``server_rounds``
    name them instead."""

    def __init__(self, work: Path, out: Path, rounds: int, timeout: float, seed: int, between: bool, *,
                 config: Path, nodes: int = NODES, node_kills: int | None = None, server_kills: int = 2,
                 node_rounds: list[int] | dict[int, int | tuple[int, ...]] | None = None, server_rounds: list[int] | None = None,
                 extra_overrides: list[str] | None = None) -> None:
        from fedblend.deploy.certs import make_certs
        from fedblend.deploy.local import LocalDeployment

        if nodes < 3 and between:
            raise ValueError("soak: the between-rounds variant kills 2 SuperNodes besides node 0: nodes >= 3")
        if nodes < 2:
            raise ValueError("soak: node 0 is never killed: nodes >= 2")
        self.work, self.out, self.rounds, self.between = work, out, rounds, between
        self.config, self.nodes = Path(config), nodes
        self.rng = random.Random(seed)
        self.overrides = [*overrides(rounds, timeout, nodes), *(extra_overrides or [])]
        R = rounds
        if node_rounds is None:
            n_node = max(1, round(0.1 * R)) if node_kills is None else node_kills
            node_rounds = sorted(self.rng.sample(range(1, R), min(n_node, R - 1)))
        if server_rounds is None:
            pool = range(max(1, R // 5), R)
            server_rounds = sorted(self.rng.sample(pool, min(server_kills, len(pool))))
        self.node_rounds = (dict(node_rounds) if isinstance(node_rounds, dict)
                            else {r: self.rng.randrange(1, nodes) for r in node_rounds})
        self.server_rounds = list(server_rounds)
        self.delays = {r: self.rng.uniform(0.5, 3.0) for r in [*node_rounds, *server_rounds]}
        certs = make_certs(work / "certs", nodes=nodes)
        self.dep = LocalDeployment(nodes, work, certs=certs, auth=True)
        self.run_ids: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.restarting: dict[int, dict[str, Any]] = {}  # node -> its kill event, until it is back
        self.retry_at: dict[int, float] = {}
        self.t0 = time.monotonic()

    # ---- what is running ------------------------------------------------------------------
    def roles(self) -> dict[str, psutil.Process]:
        """The long-lived processes by role (the newest daemon of each name)."""
        out: dict[str, psutil.Process] = {}
        for d in self.dep.daemons:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(d.proc.pid)
                if not _alive(p):
                    continue
                out[d.name] = p
                for c in p.children(recursive=True):
                    if "flower-superexec" in _cmd(c):
                        out[f"{d.name}/superexec"] = c
        for p in self.dep.processes():
            cmd = _cmd(p)
            if "flower-superexec" in cmd and "superlink/superexec" not in out and "--plugin-type serverapp" in cmd:
                out["superlink/superexec"] = p
            if "flwr-serverapp" in cmd:
                out["serverapp"] = p
        return out

    def sample(self, rnd: int) -> None:
        procs = {}
        for role, p in sorted(self.roles().items()):
            with contextlib.suppress(psutil.Error):
                procs[role] = {"pid": p.pid, "rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds()}
        self.samples.append({"round": rnd, "t_s": time.monotonic() - self.t0, "procs": procs,
                             "node_disk_bytes": self.node_disk(), "snapshots": self.snapshot_count()})

    def node_disk(self) -> int:
        return sum(p.stat().st_size for p in (self.work / "nodes").rglob("*") if p.is_file())

    def snapshot_count(self) -> int:
        return sum(1 for _ in (self.work / "nodes").rglob("snapshots/*.safetensors"))

    def logged(self) -> list[dict[str, Any]]:
        p = self.out / "metrics.jsonl"
        if not p.is_file():
            return []
        rows = []
        for line in p.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def checkpointed(self) -> int:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.out / "checkpoint" / "state.json").read_text())["rounds_completed"])
        return 0

    # ---- faults ---------------------------------------------------------------------------
    def submit(self, resume: bool) -> None:
        from fedblend.deploy.local import app_dir

        rc = {"config": str(self.config), "overrides": ";".join(self.overrides), "out": str(self.out),
              "node-wait-s": 600}
        if resume:
            rc["resume"] = True
        self.run_ids.append(self.dep.submit(app_dir(), rc))

    def kill_server(self, rnd: int, nodes: tuple[int, ...] = ()) -> None:
        """SIGKILL the ServerApp (and, between rounds, ``nodes`` with it); submit the run
        again with ``resume`` once the killed nodes are back."""
        p = self.roles().get("serverapp")
        if p is None:
            return
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
            p.wait(30)
        self.events.append({"kind": "server_kill", "round": rnd, "checkpointed": self.checkpointed(),
                            "t_s": time.monotonic() - self.t0})
        for i in nodes:
            self.kill_node(i, rnd)
        self.dep.flwr("stop", str(self.run_ids[-1]), "fedblend-local")
        while self.restarting:
            self.restart_nodes()
            time.sleep(0.5)
        self.submit(resume=True)

    def kill_node(self, i: int, rnd: int) -> None:
        """SIGKILL SuperNode ``i`` (or, if ``i`` is still coming back from an earlier kill,
        another one that is up, node 0 never) with everything it started; restart it."""
        if i in self.restarting:
            up = [j for j in range(1, self.nodes) if j not in self.restarting]
            if not up:
                self.events.append({"kind": "node_kill_skipped", "round": rnd, "why": "every node 1.. is restarting"})
                return
            i = self.rng.choice(up)
        d = next(d for d in reversed(self.dep.daemons) if d.name == f"supernode_{i}")
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(d.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(d.pgid, signal.SIGKILL)
        d.proc.wait(30)
        self.dep.daemons.remove(d)
        ev = {"kind": "node_kill", "node": i, "round": rnd, "t_s": time.monotonic() - self.t0, "starts": 0,
              "activations_before": self.activations(i)}
        self.events.append(ev)
        self.restarting[i] = ev
        self.restart_nodes()

    def activations(self, i: int) -> int:
        log = self.dep.work / "logs" / f"supernode_{i}.log"
        return log.read_text(errors="replace").count("SuperNode ID:") if log.is_file() else 0

    def restart_nodes(self) -> None:
        """(Re)start killed SuperNodes until one is activated (its log names its node id):
        the SuperLink refuses to activate a node id whose last heartbeat is under 2 x 30 s old
        (flower-supernode exits with 305), and a SIGKILLed node never said goodbye."""
        now = time.monotonic()
        for i, ev in list(self.restarting.items()):
            d = next((d for d in reversed(self.dep.daemons) if d.name == f"supernode_{i}"), None)
            if d is not None and d.proc.poll() is None:
                if self.activations(i) > ev["activations_before"]:
                    ev["back_after_s"] = now - self.t0 - ev["t_s"]
                    del self.restarting[i]
                continue
            if d is not None:  # exited (305): its SuperExec would linger, waiting for it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(d.pgid, signal.SIGKILL)
                self.dep.daemons.remove(d)
            if now < self.retry_at.get(i, 0):
                continue
            self.dep.start_node(i)
            ev["starts"] += 1
            self.retry_at[i] = now + 5

    # ---- the run --------------------------------------------------------------------------
    def run(self, deadline_s: float) -> dict[str, Any]:
        """The soak; the deployment is stopped whatever happens."""
        try:
            return self._run(deadline_s)
        finally:
            self.dep.stop()

    def _run(self, deadline_s: float) -> dict[str, Any]:
        R = self.rounds
        plan_nodes, server_rounds, delays = self.node_rounds, self.server_rounds, self.delays
        done_nodes: set[int] = set()
        done_server: set[int] = set()
        sampled: set[int] = set()
        self.dep.start()
        self.submit(resume=False)
        seen_start: dict[int, float] = {}
        while not (self.out / "summary.json").is_file():
            if time.monotonic() - self.t0 > deadline_s:
                raise FedblendError(f"soak: not finished after {deadline_s:.0f} s; see {self.work}/logs")
            rows = self.logged()
            cur = len(rows)  # the round in progress
            seen_start.setdefault(cur, time.monotonic())
            if (cur % 10 == 0 or cur == R) and cur not in sampled and cur > 0:
                sampled.add(cur)
                self.sample(cur)
            since = time.monotonic() - seen_start[cur]
            self.restart_nodes()
            if cur in plan_nodes and cur not in done_nodes and not self.between and since >= delays[cur]:
                done_nodes.add(cur)
                planned = plan_nodes[cur]
                for i in planned if isinstance(planned, tuple) else (planned,):
                    self.kill_node(i, cur)
            if cur in server_rounds and cur not in done_server:
                if self.between and self.checkpointed() == cur:
                    done_server.add(cur)  # right after the checkpoint of round cur - 1, with 2 nodes
                    self.kill_server(cur, tuple(self.rng.sample(range(1, self.nodes), 2)))
                elif not self.between and since >= delays[cur]:
                    done_server.add(cur)
                    self.kill_server(cur)
            time.sleep(0.1)
        wall = time.monotonic() - self.t0
        st = self.dep.wait(self.run_ids[-1], 600)
        self.dep.stop()
        time.sleep(1.0)
        left = self.dep.processes()
        return self.report(st, wall, [f"{p.pid} {_cmd(p)[:80]}" for p in left])

    def report(self, status: dict[str, Any], wall: float, left: list[str]) -> dict[str, Any]:
        rows = self.logged()
        nums = [r["round"] for r in rows]
        first = next((s for s in self.samples if s["round"] == 10), self.samples[0] if self.samples else None)
        last = self.samples[-1] if self.samples else None
        growth: dict[str, dict[str, Any]] = {}
        if first and last:
            for role, a in first["procs"].items():
                b = last["procs"].get(role)
                if b is None:
                    continue
                growth[role] = {"same_process": a["pid"] == b["pid"], "rss_mb": [a["rss_mb"], b["rss_mb"]],
                                "fds": [a["fds"], b["fds"]], "rss_ratio": b["rss_mb"] / a["rss_mb"],
                                "fd_ratio": b["fds"] / max(1, a["fds"])}
        long_lived = {r: g for r, g in growth.items() if g["same_process"]}
        return {
            "rounds": self.rounds,
            "rounds_logged": len(set(nums)) if nums == list(range(len(nums))) else 0,
            "rounds_contiguous": nums == list(range(self.rounds)),
            "server_kills": sum(e["kind"] == "server_kill" for e in self.events),
            "node_kills": sum(e["kind"] == "node_kill" for e in self.events),
            "rss_growth": max((g["rss_ratio"] for g in long_lived.values()), default=None),
            "fd_growth": max((g["fd_ratio"] for g in long_lived.values()), default=None),
            "node_disk_bytes": max((s["node_disk_bytes"] for s in self.samples), default=0),
            "processes_left": len(left),
            "run_status": status.get("status"),
            "wall_s": wall,
            "rounds_with_drops": sum(bool(r.get("dropped")) for r in rows),
            "every_round_accounts_for_its_clients": all(
                set(r["answered"]) | {int(c) for c in r.get("dropped", {})} == set(r["clients"]) for r in rows),
            "growth": growth,
            "events": self.events,
            "samples": self.samples,
            "per_round": [{"round": r["round"], "clients": r["clients"], "answered": r["answered"],
                           "dropped": r.get("dropped", {}), "seconds": r["seconds"]} for r in rows],
            "left": left,
            "run_ids": self.run_ids,
        }


def compare_inprocess(soak: Soak, ref_dir: Path) -> dict[str, Any]:
    """The Flower run against the same config in-process: scores, bytes, every adapter."""
    from safetensors.torch import load_file

    from fedblend.config import load_config
    from fedblend.runner import run_experiment
    from fedblend.store.rundir import RunDir

    out, work = soak.out, soak.dep.work
    ref = run_experiment(load_config(soak.config, soak.overrides), ref_dir)
    got = RunDir(out).summary()
    diffs: dict[str, float] = {}
    pairs = [(out / "adapters" / "global", ref_dir / "adapters" / "global")]
    for i in range(soak.nodes):
        for nr in (work / "nodes" / f"node_{i}").glob("run-*"):
            pairs.append((nr / "adapters" / "local" / f"client_{i}", ref_dir / "adapters" / "local" / f"client_{i}"))
    for a, b in pairs:
        ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        diffs[str(a.relative_to(a.parents[2]))] = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    return {"scores_equal": got["clients"] == ref["clients"], "bytes_equal": got["comm"] == ref["comm"],
            "adapter_max_abs_diff": max(diffs.values()), "adapters": diffs}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"
