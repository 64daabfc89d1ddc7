"""Text measurements of ``fedblend bench``: local updates and rounds through the library's own
round loop and in-process dispatch, and P / TTP generation through the modality's evaluation
(the code paths a run takes), with the tokens they process counted for the FLOP arithmetic."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import Algorithm, ClientContext, client_seed
from fedblend.bench.flops import LinearCounts, RateProbe, eval_flops, linear_counts, train_flops
from fedblend.config import ExperimentConfig
from fedblend.engines.inprocess import local_dispatch
from fedblend.modalities import modality_for
from fedblend.modality import Modality, Prepared
from fedblend.rounds import LoopResult, run_round_loop
from fedblend.runner import initial_states
from fedblend.store.rundir import RunDir


@dataclass
class Session:
    """One trained text federation, held in memory for the evaluation measurements."""

    cfg: ExperimentConfig
    mod: Modality
    fed: Any
    algorithm: Algorithm
    trainer: Any
    prep: Prepared
    loop: LoopResult
    rounds: list[dict[str, Any]]
    counts: LinearCounts
    train: dict[str, Any] = field(default_factory=dict)


def client_tokens(trainer: Any, cid: int, examples: Any) -> tuple[float, float]:
    """Mean non-padding tokens and mean response positions (labels the loss uses) per example,
    from the trainer's own tokenization (the cache ``local_update`` reads)."""
    data = trainer.tokenize(("client", cid), examples)
    tokens = sum(len(ids) for ids, _ in data) / len(data)
    response = sum(sum(1 for t in y[1:] if t != -100) for _, y in data) / len(data)
    return tokens, response


def train_session(cfg: ExperimentConfig, workdir: Path, probe: RateProbe | None = None) -> Session:
    """Build the federation and trainer, run ``cfg.train.rounds`` rounds with the in-process
    dispatch, and account every client's local update: seconds (the engine's ``train_s``),
    optimizer steps, examples drawn, tokens and useful FLOPs. With a ``probe``, a matmul burst
    runs before each local update (outside its ``train_s``; its seconds leave the round's)."""
    mod = modality_for(cfg)
    cfg = mod.cfg
    fed = mod.build_federation()
    algorithm = make_algorithm(cfg)
    trainer = mod.load_trainer(mod.describe(fed))
    prep = mod.prepare(trainer, fed, algorithm, None)
    run = RunDir(workdir)
    run.start(cfg.to_dict(), resume=False)
    transport, counters, server_state, client_states = initial_states(
        algorithm, trainer, run, list(prep.train_data), 0, None)
    dispatch = local_dispatch(algorithm, trainer, prep.train_data, cfg, transport, client_states)
    probe_s: dict[int, float] = {}
    if probe is not None:
        dispatch = _probed(dispatch, probe, probe_s)
    loop = run_round_loop(algorithm, sorted(prep.train_data), cfg, run, transport, server_state,
                          dispatch, client_states=client_states, counters=counters)
    rounds = run.rounds()
    counts = linear_counts(trainer.model)
    flops = seconds = tokens = 0.0
    per_round = []
    for rec in rounds:
        client_s = 0.0
        for cid_s, m in rec["client_metrics"].items():
            cid = int(cid_s)
            examples = prep.train_data[cid]
            tok, resp = client_tokens(trainer, cid, examples)
            steps = algorithm.update_steps(len(examples), rec["round"], trainer)
            drawn = steps * min(cfg.train.batch_size, len(examples))  # examples through the model
            flops += train_flops(counts, drawn * tok, drawn * resp)
            tokens += drawn * tok
            seconds += m["train_s"]
            client_s += m["train_s"]
        wall = rec["seconds"] - probe_s.get(rec["round"], 0.0)
        per_round.append({"round": rec["round"], "seconds": wall, "clients_s": client_s,
                          "overhead_s": wall - client_s, "loss": rec["loss"]})
    n = max(1, len(per_round))
    train = {
        "flops": flops, "seconds": seconds, "tokens": tokens,
        "seconds_per_round": sum(r["seconds"] for r in per_round) / n,
        "engine_overhead_s_per_round": sum(r["overhead_s"] for r in per_round) / n,
        "final_loss": per_round[-1]["loss"] if per_round else None,
        "rounds": per_round,
    }
    return Session(cfg, mod, fed, algorithm, trainer, prep, loop, rounds, counts, train)


def _probed(dispatch: Any, probe: RateProbe, probe_s: dict[int, float]) -> Any:
    """The in-process dispatch one client at a time, a probe burst before each (the clients'
    updates are independent, so this is the same round); probe seconds per round."""

    def run(rnd: int, payloads: dict[int, Any]) -> tuple[dict[int, Any], dict[int, str]]:
        updates: dict[int, Any] = {}
        dropped: dict[int, str] = {}
        for cid, payload in payloads.items():
            probe_s[rnd] = probe_s.get(rnd, 0.0) + probe.burst()
            u, d = dispatch(rnd, {cid: payload})
            updates.update(u)
            dropped.update(d)
        return updates, dropped

    return run


class GenerationCounter:
    """Counts the non-padding prompt tokens and generated tokens of every ``generate`` call on
    a model, and the non-padding tokens of forward passes made outside ``generate`` (FedDPA's
    embedding pass for its instance-wise weights): wrappers around the instance's methods,
    removed on exit."""

    def __init__(self, model: Any, eos_id: int | None, pad_id: int | None,
                 probe: RateProbe | None = None) -> None:
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.probe = probe
        self.probe_s = 0.0  # seconds of probe bursts taken before each batch
        self.calls = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.embed_tokens = 0  # forward passes outside generate
        self._generating = False

    def _add(self, ids: torch.Tensor | None, mask: torch.Tensor | None, out: Any) -> None:
        seqs = getattr(out, "sequences", out)
        if ids is None or not isinstance(seqs, torch.Tensor):
            return
        self.calls += 1
        self.prompt_tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        for row in seqs[:, ids.shape[1]:].tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t == self.eos_id:
                    n = j + 1  # the EOS was computed; what follows is padding
                    break
                if t == self.pad_id:
                    n = j
                    break
            self.generated_tokens += n

    def _burst(self) -> None:
        if self.probe is not None:
            self.probe_s += self.probe.burst()

    @contextlib.contextmanager
    def counting(self) -> Iterator[GenerationCounter]:
        original, forward = self.model.generate, self.model.forward

        def generate(*args: Any, **kwargs: Any) -> Any:
            self._burst()
            self._generating = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._generating = False
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._add(ids, kwargs.get("attention_mask"), out)
            return out

        def counted_forward(*args: Any, **kwargs: Any) -> Any:
            if not self._generating:
                self._burst()
                mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
                if isinstance(mask, torch.Tensor):
                    self.embed_tokens += int(mask.sum())
                elif isinstance(ids, torch.Tensor):
                    self.embed_tokens += int(ids.numel())
            return forward(*args, **kwargs)

        self.model.generate = generate
        self.model.forward = counted_forward
        try:
            yield self
        finally:
            del self.model.generate
            del self.model.forward


def has_cross_client_batch(cfg: ExperimentConfig) -> bool:
    return "cross_client_batch" in type(cfg.eval).model_fields


def evaluate_timed(s: Session, ttp: bool, cross_client_batch: bool | None = None,
                   probe: RateProbe | None = None) -> dict[str, Any]:
    """Evaluate every client as a run does (``Modality.evaluate``; fresh client contexts, so
    each evaluation embeds its FedDPA reference prompts anew) with ``eval.ttp`` and, where the
    build has it, ``eval.cross_client_batch`` set; seconds, tokens, useful FLOPs. With a
    ``probe``, a matmul burst runs before each batch (its seconds are not the evaluation's)."""
    cfg = s.cfg
    saved = {"ttp": cfg.eval.ttp}
    cfg.eval.ttp = ttp
    if cross_client_batch is not None:
        saved["cross_client_batch"] = cfg.eval.cross_client_batch
        cfg.eval.cross_client_batch = cross_client_batch
    rounds = cfg.train.rounds
    cids = [c.cid for c in s.fed.clients]
    final = s.algorithm.final_payload(s.loop.server_state)
    finals = dict.fromkeys(cids, final)
    states = {cid: s.loop.client_states.get(cid, {}) for cid in cids}
    contexts = {cid: ClientContext(cid=cid, round=rounds, seed=client_seed(cfg.seed, rounds, cid),
                                   examples=s.prep.examples[cid], trainer=s.trainer, cfg=cfg)
                for cid in cids}
    counter = GenerationCounter(s.trainer.model, s.trainer.eos_id, s.trainer.pad_id, probe)
    try:
        with counter.counting():
            t = time.perf_counter()
            ev = s.mod.evaluate(s.algorithm, s.trainer, s.fed, s.prep, finals, states, contexts, None)
            seconds = time.perf_counter() - t - counter.probe_s
    finally:
        for k, v in saved.items():
            setattr(cfg.eval, k, v)
    generation = eval_flops(s.counts, counter.prompt_tokens, counter.generated_tokens)
    # FedDPA's dynamic weights need one forward over each test prompt and the client's reference
    # prompts (hidden states only: the output projection runs at the last position)
    embedding = 2.0 * s.counts.body * counter.embed_tokens
    return {"seconds": seconds, "generate_calls": counter.calls,
            "prompt_tokens": counter.prompt_tokens, "generated_tokens": counter.generated_tokens,
            "embed_tokens": counter.embed_tokens,
            "flops": generation + embedding if counter.calls else None,
            "generation_flops": generation, "embedding_flops": embedding,
            "instances": ev.times.get("generated_instances")}
