"""Flower's simulation runtime: the shipped Flower app with N virtual SuperNodes on Ray.

The ServerApp (:mod:`fedblend.engines.flower.server_app`) runs in this process, in a thread
of Flower's simulation driver; the ClientApp (:mod:`fedblend.engines.flower.client_app`)
runs in a pool of Ray actors, ``floor(CPUs / cpus_per_client)`` of them (also bounded by
``GPUs / gpus_per_client``), which handle the virtual nodes' messages one at a time. Virtual
node ``i`` gets ``node_config = {"partition-id": i, "num-partitions": N}``, so it acts as
fedblend client ``fed.clients[i]``, as a SuperNode started with that partition id does.

Each actor builds the federation and loads the frozen backbone once per run (the worker cache
of :mod:`fedblend.engines.flower.node`). Virtual nodes keep their private state on disk only,
under ``<work>/nodes/run-<key>/client_<cid>.safetensors`` (``FEDBLEND_NODE_DIR``; client ids
are one per partition), not in Flower's ``context.state``, which the simulation driver
would hold for every node in memory.

Ray is started here, private and on 127.0.0.1 only (``address="local"``), and stopped at the
end, on success, failure and Ctrl-C; with ``ray_address`` it joins a running Ray cluster
(``ray start --head`` / ``ray start --address``) instead and leaves it running.

Needs ``pip install 'fedblend[simulation]'`` (``flwr[simulation]``: Ray).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from fedblend.config import ExperimentConfig, load_config
from fedblend.deploy.local import QUIET_ENV, check_resume
from fedblend.errors import ConfigError, FedblendError

INSTALL_HINT = "pip install 'fedblend[simulation]' (or 'flwr[simulation]>=1.41,<1.42')"
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",  # never rebuild a uv environment in the workers
    "RAY_DEDUP_LOGS": "0",
    # Ray's C++ core otherwise replaces Python's SIGTERM handler in this process: it printed a
    # stack dump and killed the process, skipping the run's status and Ray's shutdown
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
}
# Linux: Ray's servers (GCS, raylet, workers) listen on 127.0.0.1 only; for a private,
# single-machine Ray, never for a cluster
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def simulation_missing() -> str | None:
    """Why the simulation runtime cannot run here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return f"Flower's simulation runtime needs Ray: {INSTALL_HINT}"
    return None


def expected_clients(cfg: ExperimentConfig) -> int | None:
    """The number of clients ``cfg`` describes, where the config alone says it."""
    if cfg.data.clients:
        return len(cfg.data.clients)
    if cfg.data.kind != "synthetic" and cfg.data.layout == "task_per_client":
        return None  # up to num_clients: as many as the data has tasks
    return cfg.data.num_clients


@dataclass
class SimResult:
    work: Path  # node state (nodes/), logs (logs/simulation.log)
    actors: int  # Ray actors the virtual nodes ran on (local Ray); 0 when unknown (cluster)
    times: dict[str, float] = field(default_factory=dict)  # ray_init_s, simulation_s, ray_stop_s, wall_s


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (Ray's workers inherit them at ``ray.init``);
    restore the whole environment after (Flower also rewrites ``PYTHONPATH``)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _StoppableGrid:
    """The simulation's Grid, whose ``send_and_receive`` gives up once ``stop`` is set (Ctrl-C,
    SIGTERM, or the runtime ended): the ServerApp thread then ends instead of waiting out
    ``message-timeout-s`` for nodes that are gone, and the process can exit."""

    def __init__(self, grid: Any, stop: threading.Event, poll_s: float = 0.05) -> None:
        self._grid, self._stop, self._poll_s = grid, stop, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        got: list[Any] = []
        while waiting:
            if self._stop.is_set():
                raise KeyboardInterrupt("the simulation runtime stopped")
            replies = list(self._grid.pull_messages(waiting))
            got += replies
            waiting -= {r.metadata.reply_to_message_id for r in replies}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll_s)
        return got


class _Interrupt:
    """SIGTERM and Ctrl-C during a simulation: stop the ServerApp (its Grid gives up, the run's
    status.json says ``interrupted``), let Flower wind its runtime down, and raise afterwards
    (:meth:`reraise`). Raising in the main thread right away instead left one of Flower's
    worker threads waiting in ``ray.get`` on a Ray that was gone, and the process never
    exited. Workers still busy after ``grace`` s (a long local update) are ended, so the
    process exits within seconds. Only in the main thread (elsewhere Python has no handlers)."""

    def __init__(self, stop: threading.Event, node_dir: Path | None, grace: float = 2.0) -> None:
        self.stop, self.node_dir, self.grace = stop, node_dir, grace
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        self.stop.set()
        if first and self.node_dir is not None:
            t = threading.Timer(self.grace, self._end_workers)
            t.daemon = True
            t.start()

    def _end_workers(self) -> None:
        assert self.node_dir is not None
        # Ray's driver prints each worker death the raylet reports on stdout; ended on purpose,
        # they are expected: log them at INFO (below Ray's level) instead (ray 2.55's function)
        with contextlib.suppress(Exception):
            from ray._private import worker as ray_worker

            log = logging.getLogger("ray")
            ray_worker.print_to_stdstream = lambda data, **kw: log.info("%s", data.get("lines"))
        _end_processes(self.node_dir, workers_only=True)

    def reraise(self) -> None:
        from fedblend.signals import Interrupted

        if self.signum == signal.SIGTERM:
            raise Interrupted("SIGTERM")
        if self.signum is not None:
            raise KeyboardInterrupt


def _server_app(run_config: dict[str, Any], stop: threading.Event) -> Any:
    """The fedblend ServerApp with ``run_config`` (Flower's ``run_simulation`` gives it none)."""
    from flwr.serverapp import ServerApp

    from fedblend.engines.flower import server_app

    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        context.run_config = {**context.run_config, **run_config}
        try:
            server_app.main(_StoppableGrid(grid, stop), context)
        except KeyboardInterrupt:
            return  # status.json already says "interrupted"; the main thread re-raises
        finally:
            stop.set()

    return app


def pool_size(cpus: float, gpus: float, cpus_per_client: float, gpus_per_client: float) -> int:
    """Ray actors Flower creates on one node with these resources (its ``pool_size_from_resources``)."""
    n = math.floor(cpus / cpus_per_client)
    if gpus_per_client > 0:
        n = min(n, math.floor(gpus / gpus_per_client))
    return n


def deploy_sim(
    config: Path, nodes: int | None, overrides: list[str], out: Path, work: Path | None = None,
    cpus_per_client: float = 1.0, gpus_per_client: float = 0.0, ray_address: str | None = None,
    ray_cpus: float | None = None, resume: bool = False, node_wait_s: float = 300,
    message_timeout_s: float = 3600, verbose: bool = False,
) -> tuple[dict[str, Any], SimResult]:
    """Run ``config`` on Flower's simulation runtime with ``nodes`` virtual SuperNodes (default:
    one per client of the config); returns the summary, as ``fedblend run`` writes it into ``out``.

    ``cpus_per_client`` / ``gpus_per_client`` (fractions allowed) are each virtual node's Ray
    resources: they set how many run at once, not a limit on what one uses. ``ray_cpus``:
    CPUs of the private Ray (default: all). ``ray_address``: join that Ray cluster
    (``"auto"``, ``"<head-ip>:6379"``) instead of starting one.
    """
    from fedblend.store.rundir import RunDir

    why = simulation_missing()
    if why:
        raise ConfigError(why)
    out = Path(out).resolve()
    cfg = load_config(config, overrides)
    want = expected_clients(cfg)
    if nodes is None:
        if want is None:
            raise ConfigError("--nodes: this config's client count depends on its data; pass --nodes N")
        nodes = want
    if want is not None and nodes != want:
        raise ConfigError(f"--nodes {nodes}: the config has {want} clients (data.num_clients); "
                          f"one virtual SuperNode per client (--set data.num_clients={nodes})")
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: need at least 1")
    if cpus_per_client <= 0 or gpus_per_client < 0:
        raise ConfigError(f"--cpus-per-client {cpus_per_client:g} must be > 0 and "
                          f"--gpus-per-client {gpus_per_client:g} >= 0")
    check_resume(out, resume)
    actors = 0
    if ray_address is None:
        cpus = float(ray_cpus or os.cpu_count() or 1)
        gpus = 0
        if gpus_per_client > 0:
            import torch

            gpus = torch.cuda.device_count()
        actors = pool_size(cpus, gpus, cpus_per_client, gpus_per_client)
        if actors < 1:
            have = f"{cpus:g} CPUs" + (f" and {gpus} GPUs" if gpus_per_client > 0 else "")
            raise ConfigError(f"--cpus-per-client {cpus_per_client:g} --gpus-per-client "
                              f"{gpus_per_client:g}: not one virtual node fits in {have}")

    work = Path(work or out.parent / f".{out.name}.sim").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**QUIET_ENV, **RAY_ENV, **({} if ray_address else RAY_LOOPBACK_ENV),
           "FEDBLEND_NODE_DIR": str(work / "nodes"),
           "FEDBLEND_NODE_CONTEXT_STATE": "0"}  # private state on disk only
    run_config = {"config": str(Path(config).resolve()), "overrides": ";".join(overrides),
                  "out": str(out), "node-wait-s": node_wait_s,
                  "message-timeout-s": message_timeout_s, "resume": resume}
    from fedblend.runlog import third_party_to

    # a short private temp dir: Ray's socket paths must stay under ~107 characters
    temp_dir = None if ray_address else tempfile.mkdtemp(prefix="fbray-", dir="/tmp")
    stop = threading.Event()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    node_dir = None if ray_address else work / "nodes"
    interrupt = _Interrupt(stop, node_dir)
    try:
        with _environ(env):
            # imported with Ray's variables set (it reads some on import, e.g. the loopback
            # switch) and before the logs are routed (importing flwr adds a console handler)
            import flwr.serverapp
            import flwr.simulation  # noqa: F401
            import ray  # noqa: F401
        with _environ(env), third_party_to(work / "logs" / "simulation.log"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
            times["ray_init_s"] = _init_ray(ray_address, ray_cpus, gpus_per_client, temp_dir, verbose)
            with interrupt:  # after ray.init, which sets a SIGTERM handler of its own (sys.exit)
                t = time.perf_counter()
                try:
                    if not stop.is_set():
                        _run(nodes, _server_app(run_config, stop), cpus_per_client, gpus_per_client, verbose)
                finally:
                    stop.set()  # the ServerApp thread ends if the runtime stopped under it
                    times["simulation_s"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        _stop_ray(node_dir)
        times["ray_stop_s"] = time.perf_counter() - t
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    times["wall_s"] = time.perf_counter() - t0
    interrupt.reraise()
    run = RunDir(out)
    if not run.complete:
        raise FedblendError(f"the simulation ended but {out} is not complete; see {work / 'logs'}")
    return run.summary(), SimResult(work, actors, times)


def _init_ray(address: str | None, cpus: float | None, gpus_per_client: float, temp_dir: str | None,
              verbose: bool) -> float:
    """Start (or join) Ray ourselves, so its start-up is timed apart; Flower then uses it."""
    import ray

    args: dict[str, Any] = {
        "include_dashboard": False, "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "ERROR",
        # the workers import fedblend (and the driver's packages) as the driver does
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    }
    if address:
        args["address"] = address
    else:
        args.update(address="local", num_cpus=cpus or os.cpu_count() or 1, _temp_dir=temp_dir)
        if gpus_per_client == 0:
            args["num_gpus"] = 0
    t = time.perf_counter()
    ray.init(**args)
    return time.perf_counter() - t


def _run(nodes: int, server: Any, cpus_per_client: float, gpus_per_client: float, verbose: bool) -> None:
    from flwr.simulation import run_simulation

    from fedblend.engines.flower import client_app

    run_simulation(
        server_app=server, client_app=client_app.app, num_supernodes=nodes, backend_name="ray",
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}},
        verbose_logging=verbose,
    )


def _stop_ray(node_dir: Path | None = None, grace: float = 5.0) -> None:
    """Flower shuts Ray down at the end of a run; also after a failure or Ctrl-C. Then, for a
    private Ray (``node_dir``), end its worker processes still alive: after ``ray.shutdown()``
    the actors outlived their raylet by about two minutes here, holding the backbone."""
    if "ray" in sys.modules:
        import ray

        with contextlib.suppress(Exception):
            if ray.is_initialized():
                ray.shutdown()
    if node_dir is not None:
        _end_processes(node_dir, workers_only=False, grace=grace)


def _end_processes(node_dir: Path, workers_only: bool, grace: float = 5.0) -> None:
    """End the processes of this simulation's private Ray (they carry its ``FEDBLEND_NODE_DIR``);
    ``workers_only``: the actors alone, not Ray's own servers."""
    import psutil

    mine = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            ours = p.pid != os.getpid() and p.environ().get("FEDBLEND_NODE_DIR") == str(node_dir)
            if ours and (not workers_only or (p.cmdline() or [""])[0].startswith("ray::")):
                mine.append(p)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
