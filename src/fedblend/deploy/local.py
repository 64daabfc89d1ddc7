"""A loopback Flower deployment: one SuperLink and N SuperNodes on 127.0.0.1.

Each daemon is started in its own session (``setsid``), so stopping it stops its process
group, ClientApp/ServerApp children included; :meth:`LocalDeployment.stop` runs on success,
failure and Ctrl-C (use it as a context manager). ``flwr run`` exits 0 even when the
ServerApp fails, so :meth:`LocalDeployment.wait` reads the run's real status from
``flwr list --format json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from fedblend.deploy.certs import DevCerts
from fedblend.deploy.gpus import check_gpus, gpu_env
from fedblend.errors import FedblendError

CONNECTION = "fedblend-local"
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def flwr_bin(name: str) -> str | None:
    """A Flower executable next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedblendError(f"daemon exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FedblendError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {log}")


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # setsid: the leader's pid is the group id


@dataclass
class LocalDeployment:
    """``with LocalDeployment(2, work_dir) as d: d.run_experiment(...)``."""

    nodes: int
    work: Path
    certs: DevCerts | None = None  # TLS when set
    auth: bool = False  # SuperNode authentication (needs certs for the node keys)
    gpus: list[int] = field(default_factory=list)  # node i sees GPU gpus[i % len] (empty: all)
    cwd: Path = field(default_factory=Path.cwd)
    daemons: list[Daemon] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.home = self.work / "flwr-home"
        if self.auth and self.certs is None:
            raise FedblendError("--auth needs node keys: pass --tls or a certs directory")

    # ---- environment ------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        import fedblend

        env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.home)}
        bindir = str(Path(sys.executable).parent)  # the SuperLink starts flower-superexec by name
        env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
        src = str(Path(fedblend.__file__).resolve().parents[1])  # ClientApps import this fedblend
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        return env

    def _tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        c = self.certs
        if server:
            return ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.server_cert),
                    "--ssl-keyfile", str(c.server_key)]
        return ["--root-certificates", str(c.ca)]

    def node_threads(self) -> int:
        """Torch threads per SuperNode: the N nodes on this host share its cores (N nodes each
        running torch's default of one thread per core oversubscribe the CPU and every step
        slows down several times). ``OMP_NUM_THREADS`` set by the user wins."""
        return max(1, (os.cpu_count() or 1) // max(1, self.nodes))

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Daemon:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**self.env(), **(extra_env or {})},
                                    cwd=self.cwd, start_new_session=True)
        d = Daemon(name, proc, log)
        self.daemons.append(d)
        return d

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        exe = flwr_bin("flwr")
        if exe is None:
            raise FedblendError("the `flwr` command is missing: pip install 'flwr>=1.41,<1.42'")
        return subprocess.run([exe, *args], capture_output=True, text=True, env=self.env(),
                              cwd=self.cwd, timeout=timeout, check=False)

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, node_ids: range | None = None) -> None:
        superlink, supernode = flwr_bin("flower-superlink"), flwr_bin("flower-supernode")
        if not superlink or not supernode:
            raise FedblendError("flower-superlink/flower-supernode not found: pip install flwr")
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [superlink, *self._tls_args(True), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.auth:
            argv.append("--enable-supernode-auth")
        link = self._spawn("superlink", argv, gpu_env(self.gpus, None))  # the ServerApp's GPU
        _wait_port(self.port, link.proc, 60, link.log)
        self._write_connection()
        for i in node_ids if node_ids is not None else range(self.nodes):
            if self.auth:
                self.register_node(i)
            self.start_node(i)

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines.append(f'root-certificates = "{self.certs.ca}"' if self.certs else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def register_node(self, i: int) -> None:
        assert self.certs is not None
        r = self.flwr("supernode", "register", str(self.certs.node_pub(i)), CONNECTION)
        if r.returncode != 0:
            raise FedblendError(f"flwr supernode register node_{i}: {r.stdout[-800:]}{r.stderr[-800:]}")

    def start_node(self, i: int, partition: int | None = None) -> Daemon:
        exe = flwr_bin("flower-supernode")
        assert exe is not None
        state = self.work / "nodes" / f"node_{i}"
        part = i if partition is None else partition
        argv = [exe, *self._tls_args(False), "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={part} num-partitions={self.nodes} state-dir=\"{state}\""]
        if self.auth and self.certs is not None:
            argv += ["--auth-supernode-private-key", str(self.certs.node_key(i))]
        threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(self.node_threads())}
        return self._spawn(f"supernode_{i}", argv, {**threads, **gpu_env(self.gpus, i)})

    def stop(self, grace: float = 10.0) -> None:
        """Stop everything this deployment started: each daemon's process group, then any
        process still tagged with this deployment's private FLWR_HOME (the SuperLink starts
        its SuperExec in a session of its own); SIGKILL what is left after ``grace``."""
        procs = self.processes()
        for d in reversed(self.daemons):
            _signal_group(d.pgid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for d in self.daemons:
            _signal_group(d.pgid, signal.SIGKILL)
        for p in alive + self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        for d in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(timeout=5)
        self.daemons.clear()

    def processes(self) -> list[psutil.Process]:
        """Live processes started by this deployment (daemons, their children, and anything
        carrying this deployment's FLWR_HOME in its environment)."""
        found: dict[int, psutil.Process] = {}
        for d in self.daemons:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(d.proc.pid)
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        home = str(self.home)
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid not in found and p.environ().get("FLWR_HOME") == home:
                    found[p.pid] = p
        return [p for p in found.values() if _running(p)]

    # ---- one run ----------------------------------------------------------------------------
    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        r = self.flwr("run", str(app_dir), CONNECTION, "--run-config", rc, "--format", "json")
        try:
            out = json.loads(r.stdout)
            return int(out["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FedblendError(f"flwr run failed: {r.stdout[-1500:]}{r.stderr[-1500:]}") from None

    def status(self, run_id: int) -> dict[str, Any]:
        r = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(r.stdout)["runs"]
            return runs[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return {"status": f"unknown ({r.stdout[-300:]}{r.stderr[-300:]})"}

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Poll until the run is finished; returns its status record."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                return st
            for d in self.daemons:
                # a SuperNode that died is the ServerApp's to leave out (engine.round_timeout)
                if d.proc.poll() is not None and not d.name.startswith("supernode"):
                    raise FedblendError(f"{d.name} exited with {d.proc.returncode}; see {d.log}")
            if time.monotonic() > deadline:
                raise FedblendError(f"run {run_id} not finished after {timeout:.0f} s: {st}")
            time.sleep(2.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def app_dir() -> Path:
    """The shipped Flower app (``flower_app/``): in a checkout, else a copy made on the fly."""
    here = Path(__file__).resolve().parents[3] / "flower_app"
    if (here / "pyproject.toml").is_file():
        return here
    from importlib.resources import files

    return Path(str(files("fedblend") / "resources" / "flower_app"))


def check_resume(out: Path, resume: bool) -> str | None:
    """What ``--resume`` of ``out`` will do, before any daemon starts: a completed run is an
    error; a run stopped before its first checkpoint (or never started) starts from round 0,
    as ``fedblend run --resume`` does, and the returned note says so."""
    from fedblend.store.rundir import RunDir

    return RunDir(out).resume_note() if resume else None


def deploy_local(
    config: Path, nodes: int, overrides: list[str], out: Path, work: Path | None = None,
    tls: bool = False, auth: bool = False, timeout: float = 3600, resume: bool = False,
    gpus: list[int] | None = None,
) -> tuple[dict[str, Any], LocalDeployment]:
    """Start a loopback deployment, run ``config`` on it, stop it; return the summary.

    The run directory ``out`` is written by the ServerApp (server side); each node's private
    state and local adapters stay under ``<work>/nodes/node_<i>/``. ``resume`` continues the
    unfinished run in ``out`` from its last checkpoint (the same ``work``: the nodes' state).
    ``gpus`` pins SuperNode i to GPU ``gpus[i % len(gpus)]``.
    """
    from fedblend.deploy.certs import make_certs
    from fedblend.store.rundir import RunDir

    out = Path(out).resolve()
    check_resume(out, resume)  # before starting any daemon
    if gpus:
        check_gpus(gpus)
    work = Path(work or out.parent / f".{out.name}.deploy").resolve()
    certs = make_certs(work / "certs", nodes=nodes) if (tls or auth) else None
    dep = LocalDeployment(nodes, work, certs=certs, auth=auth, gpus=list(gpus or []))
    with dep:
        run_id = dep.submit(app_dir(), {
            "config": str(Path(config).resolve()),
            "overrides": ";".join(overrides),
            "out": str(out),
            **({"resume": True} if resume else {}),
        })
        st = dep.wait(run_id, timeout)
    run = RunDir(out)
    if not str(st.get("status", "")).endswith("completed") or not run.complete:
        tail = ""
        link_log = work / "logs" / "superlink.log"
        if link_log.is_file():
            tail = "\n".join(link_log.read_text(errors="replace").splitlines()[-15:])
        raise FedblendError(f"run {run_id} {st.get('status')}; see {work / 'logs'}\n{tail}")
    return run.summary(), dep
