"""One runner for both modalities: run an experiment (or re-evaluate one) and write its run
directory. This is the entry point the CLI, ``compare``, ``reproduce`` and the benchmarks call.

Where each round's ``local_update`` calls run is a dispatch factory: the in-process engine's
(:func:`fedblend.engines.inprocess.local_dispatch`, clients in turn in this process) unless the
caller passes another. The Flower engine drives the same round loop from its ServerApp and uses
this module's checkpoint and completion helpers. Third-party warnings and logs go to the run's
``run.log``, not the terminal."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import Algorithm, ClientContext, State, client_seed
from fedblend.comm.codec import Message, decode, encode
from fedblend.config import ExperimentConfig
from fedblend.engines.inprocess import local_dispatch
from fedblend.modalities import modality_for
from fedblend.modality import Modality, Prepared
from fedblend.rounds import (
    Dispatch,
    Tap,
    Transport,
    complete_run,
    resume_checkpoint,
    run_round_loop,
)
from fedblend.runlog import third_party_to
from fedblend.store.clients import ClientStore
from fedblend.store.files import load_state, save_state
from fedblend.store.rundir import RunDir

MakeDispatch = Callable[
    [Algorithm, Any, dict[int, Sequence[Any]], ExperimentConfig, Transport, dict[int, State], Any], Dispatch
]
"""(algorithm, trainer, train data, cfg, transport, client states, progress) -> dispatch: the
engine's way of running one round's ``local_update`` calls."""


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Any]:
    """Rich bars on a terminal; elsewhere none (the loop prints plain lines, plain_progress)."""
    if not enabled or not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=True,
    ) as p:
        yield p


def prepare_torch(cfg: ExperimentConfig) -> float:
    """Thread count and global seed for a run; returns the start time."""
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.seed)
    return time.perf_counter()


def client_store(algorithm: Algorithm, trainer: Any, run: RunDir) -> ClientStore:
    """The clients' private states, on disk in the run's ``clients/`` (read for the sampled
    clients only). A client never written reads as the algorithm's fresh state, computed when
    first asked for, with the global RNG left as it was."""

    def init(cid: int) -> State:
        with torch.random.fork_rng(devices=[]):
            return algorithm.init_client_state(trainer, cid)

    return ClientStore(run.path / "clients", init=init,
                       keep_committed=bool(algorithm.cfg.engine.checkpoint_every))


def _adopt_unversioned_client_states(run: RunDir, store: ClientStore, rounds_completed: int) -> None:
    """A checkpoint written by an earlier fedblend kept every client's state in
    ``checkpoint/clients/<cid>.safetensors``: move them into the store as the checkpoint's
    version before the first new checkpoint replaces that layout."""
    legacy = run.path / "checkpoint" / "clients"
    if not legacy.is_dir():
        return
    version = store.version
    store.version = rounds_completed
    for p in sorted(legacy.glob("*.safetensors")):
        if int(p.stem) not in store:
            store[int(p.stem)] = load_state(p)
    store.version = version


def initial_states(algorithm, trainer, run: RunDir, client_ids: list[int], start_round: int, tap: Tap | None):
    """Fresh server state and the client state store, or the last checkpoint's when resuming,
    with a transport whose byte counters continue from the checkpoint."""
    transport = Transport(tap=tap)
    store = client_store(algorithm, trainer, run)
    if start_round > 0:
        server_state, _, counters = resume_checkpoint(run, transport, [])
        store.limit = store.committed = start_round  # versions a crashed round wrote are not read
        _adopt_unversioned_client_states(run, store, start_round)
    else:
        counters = {"train_s": 0.0}
        server_state = algorithm.init_server_state(trainer)
        if algorithm.modality == "vision":
            # the vision trainer's fresh states re-seed the global RNG: its runs drew their
            # numbers after every client's initialisation, and still do
            for cid in client_ids:
                algorithm.init_client_state(trainer, cid)
    return transport, counters, server_state, store


def run_experiment(
    cfg: ExperimentConfig, out: str | Path, resume: bool = False, tap: Tap | None = None,
    make_dispatch: MakeDispatch = local_dispatch,
) -> dict[str, Any]:
    """Run ``cfg`` (either modality) and return its summary; a failed run leaves no
    summary.json. ``make_dispatch``: where the clients' local updates run (default: in turn,
    in this process)."""
    with third_party_to(Path(out) / "run.log"):
        run = RunDir(out)
        start_round = run.start(cfg.to_dict(), resume)
        if run.note:  # --resume with nothing to resume: the run starts over
            print(run.note, file=sys.stderr, flush=True)
        try:
            return _run(cfg, run, start_round, tap, make_dispatch)
        except BaseException as e:
            run.fail(e)
            raise


def _context(cfg: ExperimentConfig, prep: Prepared, trainer: Any, cid: int) -> ClientContext:
    rounds = cfg.train.rounds
    return ClientContext(cid=cid, round=rounds, seed=client_seed(cfg.seed, rounds, cid),
                         examples=prep.examples[cid], trainer=trainer, cfg=cfg)


def _contexts(cfg: ExperimentConfig, prep: Prepared, trainer: Any, cids: Sequence[int]) -> dict[int, ClientContext]:
    return {cid: _context(cfg, prep, trainer, cid) for cid in cids}


def _finishes(algorithm: Any) -> bool:
    """Whether the algorithm's ``finish_client`` does anything (FedDPA-F fine-tunes)."""
    inner = getattr(algorithm, "inner", algorithm)
    return type(inner).finish_client is not Algorithm.finish_client


def send_final(transport: Transport, rounds: int, cids: Sequence[int], final: Message) -> Message:
    """The final payload, sent to every client: each message counted (and tapped) as sent,
    one decoded copy shared by all (they are byte-identical)."""
    data = encode(final)
    for cid in cids:
        transport.sent_down(rounds, cid, data)
    return decode(data)


def _run(cfg: ExperimentConfig, run: RunDir, start_round: int, tap: Tap | None,
         make_dispatch: MakeDispatch) -> dict[str, Any]:
    t0 = prepare_torch(cfg)
    mod = modality_for(cfg)
    cfg = mod.cfg
    t_build = time.perf_counter()
    fed = mod.build_federation()
    build_s = time.perf_counter() - t_build
    desc = mod.describe(fed)
    algorithm = make_algorithm(cfg)
    t_load = time.perf_counter()
    trainer = mod.load_trainer(desc)
    load_s = time.perf_counter() - t_load
    cids = [c.cid for c in fed.clients]

    with progress_bars(cfg.engine.progress) as progress:
        prep = mod.prepare(trainer, fed, algorithm, progress)
        transport, counters, server_state, client_states = initial_states(
            algorithm, trainer, run, list(prep.train_data), start_round, tap
        )
        tracked = mod.track_rounds(algorithm, trainer, prep, run, start_round)
        dispatch = make_dispatch(tracked, trainer, prep.train_data, cfg, transport, client_states, progress)
        loop = run_round_loop(
            tracked, sorted(prep.train_data), cfg, run, transport, server_state, dispatch,
            client_states=client_states, start_round=start_round, counters=counters,
        )
        # the final global model goes to every client, which may then finish locally; the
        # finished states are written as they come, and only the evaluated clients' kept
        t_fin = time.perf_counter()
        final = algorithm.final_payload(loop.server_state)
        rounds = cfg.train.rounds
        received = send_final(transport, rounds, cids, final)
        keep = set(mod.eval_clients(fed))
        store = loop.client_states
        contexts: dict[int, ClientContext] = {}
        states: dict[int, State] = {}
        finishes = _finishes(algorithm)
        for cid in cids:
            if not finishes and cid not in keep and cid not in store:
                continue  # never trained, nothing to finish: its state is the fresh one, from its seed
            ctx = _context(cfg, prep, trainer, cid)
            steps = algorithm.finish_steps(len(prep.examples[cid]), trainer)
            task = progress.add_task(f"finish client {cid}", total=steps) if progress and steps else None
            if task is not None:
                ctx.progress = lambda n, t=task: progress.advance(t, n)
            st = algorithm.finish_client(ctx, received, store.get(cid, {}))
            ctx.progress = None
            if task is not None:
                progress.remove_task(task)
            if st:  # what each client holds after training (none: the final payload alone)
                save_state(run.path / "final" / "clients" / f"{cid}.safetensors", st)
            if cid in keep:
                contexts[cid], states[cid] = ctx, st
        finish_s = time.perf_counter() - t_fin
        finals = dict.fromkeys(states, received)

    save_state(run.path / "final" / "server.safetensors", final.tensors)
    train_info = {
        "comm": {"bytes_up": transport.bytes_up, "bytes_down": transport.bytes_down},
        "time": {"build_s": build_s, "load_s": load_s, **prep.times, "train_s": loop.train_s, "finish_s": finish_s},
        "extra": {"resumed_at_round": start_round or None},
    }
    return evaluate_and_summarize(mod, run, fed, desc, algorithm, trainer, prep, finals, states, contexts,
                                  train_info, t0)


def evaluate_and_summarize(
    mod: Modality, run: RunDir, fed: Any, desc: dict[str, Any], algorithm: Algorithm, trainer: Any,
    prep: Prepared, finals: dict[int, Message], states: dict[int, State],
    contexts: dict[int, ClientContext], train_info: dict[str, Any], t0: float,
) -> dict[str, Any]:
    """Evaluate every client where its state is, export adapters, write summary and report."""
    t_eval = time.perf_counter()
    with progress_bars(mod.cfg.engine.progress) as progress:
        ev = mod.evaluate(algorithm, trainer, fed, prep, finals, states, contexts, progress)
    eval_s = time.perf_counter() - t_eval
    exported = mod.export_adapters(algorithm, trainer, run, finals, states)
    times = {"wall_s": time.perf_counter() - t0, **train_info["time"], "eval_s": eval_s}
    summary = mod.summarize(run, algorithm, trainer, ev, train_info["comm"], times, desc, exported,
                            train_info["extra"])
    complete_run(run, summary)
    return summary


def evaluate_run(source: str | Path, overrides: list[str], out: str | Path) -> dict[str, Any]:
    """Re-evaluate a completed run with other inference settings (``eval.*``, FedDPA's weightings)
    from the states its clients held after training; writes a new run directory."""
    with third_party_to(Path(out) / "run.log"):
        return _evaluate_run(source, overrides, out)


def _evaluate_run(source: str | Path, overrides: list[str], out: str | Path) -> dict[str, Any]:
    from fedblend.config import config_from_dict, is_inference_setting
    from fedblend.errors import ConfigError, FedblendError

    src = RunDir(source)
    if not src.complete or not (src.path / "final" / "server.safetensors").is_file():
        raise FedblendError(f"{src.path}: not a completed run with final states (final/server.safetensors)")
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    bad = [o for o, k in zip(overrides, keys, strict=True) if not (k.startswith("engine.") or is_inference_setting(k))]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only inference settings (eval.*, an algorithm's own such as "
                          "feddpa.weighting) and engine.* can change when re-evaluating")
    cfg = config_from_dict(src.config(), overrides, source=str(src.path / "config.json"))
    run = RunDir(out)
    run.start(cfg.to_dict(), resume=False)
    try:
        t0 = prepare_torch(cfg)
        (run.path / "metrics.jsonl").write_text((src.path / "metrics.jsonl").read_text())
        mod = modality_for(cfg)
        for rel in mod.carried_files:
            if (src.path / rel).is_file():
                (run.path / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.path / rel, run.path / rel)
        fed = mod.build_federation()
        desc = mod.describe(fed)
        algorithm = make_algorithm(mod.cfg)
        trainer = mod.load_trainer(desc)
        prep = mod.prepare(trainer, fed, algorithm, None)
        cids = list(mod.eval_clients(fed))
        # the trainer's roles, as in the run; a client without a final state never trained
        # and holds its fresh one
        _, _, _, store = initial_states(algorithm, trainer, run, cids, 0, None)
        final = Message(tensors=load_state(src.path / "final" / "server.safetensors"))
        states = {}
        for cid in cids:
            p = src.path / "final" / "clients" / f"{cid}.safetensors"
            states[cid] = load_state(p) if p.is_file() else store.get(cid, {})
        old = src.summary()
        keep = ("load_s", "feature_s", "train_s", "finish_s")
        train_info = {
            "comm": {k: old["comm"][k] for k in ("bytes_up", "bytes_down")},
            "time": {k: old["time"][k] for k in keep if k in old["time"]},
            "extra": {"resumed_at_round": None, "evaluated_from": str(src.path)},
        }
        return evaluate_and_summarize(mod, run, fed, desc, algorithm, trainer, prep, dict.fromkeys(cids, final),
                                      states, _contexts(mod.cfg, prep, trainer, cids), train_info, t0)
    except BaseException as e:
        run.fail(e)
        raise
