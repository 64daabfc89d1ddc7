"""Training and inference of named LoRA adapters on one frozen causal LM.

The trainer owns the shared backbone; algorithms call it to train a role's adapter on a
client's examples (loss on response tokens only), to generate greedily in batches, and
to embed prompts (last-layer hidden state at the last prompt token).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from fedblend.adapters.lora import DualLoRA, Weight
from fedblend.config import ExperimentConfig
from fedblend.device import autocast
from fedblend.text.backbone import format_prompt
from fedblend.text.sources import Example

ProgressFn = Callable[[int], None]
StepFn = Callable[[float], None]  # called around each optimizer step with its learning rate
# per-batch context around the forward, given the batch's instruction indices (cross-client
# batched evaluation selects each row's client adapters with it)
BatchContextFn = Callable[[list[int]], contextlib.AbstractContextManager[None]]


class TextTrainer:
    def __init__(self, cfg: ExperimentConfig, backbone: torch.nn.Module, tokenizer) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.adapters = DualLoRA(backbone, cfg.lora)
        self.model = self.adapters.model
        self.device = next(backbone.parameters()).device  # where load_text_backbone put it
        self._cache: dict[tuple, list[tuple[list[int], list[int]]]] = {}
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.response_logits: bool | None = None  # None: probe the model on the first train()

    # ---- tokenization -------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, key, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (-100 on the prompt) per example; cached under ``key``."""
        cache_key = (key, len(examples))
        if cache_key not in self._cache:
            max_len = self.cfg.model.max_length
            out = []
            for ex in examples:
                prompt = self._ids(format_prompt(ex.instruction))
                resp = self._ids(ex.output)[: max_len // 2] + [self.eos_id]
                prompt = prompt[-(max_len - len(resp)) :]
                out.append((prompt + resp, [-100] * len(prompt) + resp))
            self._cache[cache_key] = out
        return self._cache[cache_key]

    def _collate(self, batch: Sequence[tuple[list[int], list[int]]]):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        return ids.to(self.device), labels.to(self.device), mask.to(self.device)

    def autocast(self):
        """Autocast to ``model.dtype`` around forward passes (a no-op in float32)."""
        return autocast(self.device, self.cfg.model.dtype)

    # ---- training -----------------------------------------------------------------------
    def train(
        self,
        key,
        examples: Sequence[Example],
        trainable: Sequence[str],
        mix: Mapping[str, Weight],
        epochs: float,
        seed: int,
        prox: tuple[float, Mapping[str, torch.Tensor]] | None = None,
        progress: ProgressFn | None = None,
        frozen: tuple[str, ...] = (),
        extra_params: Sequence[torch.nn.Parameter] = (),
        before_step: StepFn | None = None,
        after_step: StepFn | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Train the ``trainable`` roles with AdamW and a linear decay; returns loss stats.

        ``mix`` gives each role's weight in the forward pass; roles not trainable are held
        under stop-gradient, and so are the tensor kinds in ``frozen`` (e.g. ``("lora_A",)``).
        ``prox=(mu, reference)`` adds FedProx's proximal term. ``extra_params``: tensors that
        are not LoRA roles trained beside them (FedALT's router; the caller sets their
        ``requires_grad``). ``before_step(lr)`` runs after gradient clipping, just before each
        optimizer step, and ``after_step(lr)`` just after it, with that step's learning rate
        (SCAFFOLD's gradient and post-step corrections).
        ``penalty()``: a differentiable regulariser of the live adapter tensors, added to the
        loss at every step (HetLoRA's rank penalty).
        """
        tc = self.cfg.train
        data = self.tokenize(key, examples)
        n = len(data)
        steps = self.train_steps(n, epochs)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.adapters.set_trainable(trainable, frozen)
        params = self.adapters.trainable_parameters() + list(extra_params)
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        warm = int(tc.warmup_ratio * steps)

        def lr_lambda(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if tc.scheduler == "constant":
                return 1.0
            return max(0.0, (steps - step) / max(1, steps - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        losses: list[float] = []
        self._prepare_training()
        self.model.train()
        try:
            with self.adapters.mixing(mix):
                for batch_idx in sample_batches(n, tc.batch_size, steps, rng):
                    batch = [data[i] for i in batch_idx]
                    if tc.group_by_length:  # same batch, same gradient sum; less padding
                        batch.sort(key=lambda item: len(item[0]))
                    n_tokens = sum(sum(1 for t in y if t != -100) for _, y in batch)
                    opt.zero_grad(set_to_none=True)
                    total = 0.0
                    micro = min(tc.micro_batch_size, tc.batch_size)
                    for s in range(0, len(batch), micro):
                        ids, labels, mask = self._collate(batch[s : s + micro])
                        loss_sum = self._loss_sum(ids, labels, mask)
                        loss = loss_sum / n_tokens
                        if prox is not None and prox[0] > 0:
                            mu, ref = prox
                            frac = len(ids) / len(batch)
                            loss = loss + frac * (mu / 2) * _sq_dist(self.adapters, trainable, ref)
                        if penalty is not None:
                            loss = loss + len(ids) / len(batch) * penalty().to(loss.device)
                        loss.backward()
                        total += float(loss_sum.detach()) / n_tokens
                    if tc.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                    lr_now = float(opt.param_groups[0]["lr"])
                    if before_step:
                        before_step(lr_now)
                    opt.step()
                    if after_step:
                        after_step(lr_now)
                    sched.step()
                    losses.append(total)
                    if progress:
                        progress(1)
        finally:
            self.model.eval()
            self.adapters.set_trainable(())
        return {
            "loss": sum(losses) / len(losses),
            "loss_last": losses[-1],
            "steps": steps,
            "examples": n,
        }

    def _prepare_training(self) -> None:
        """Once: probe whether the model computes logits at chosen positions only, and turn
        on non-reentrant gradient checkpointing of the frozen backbone if configured."""
        if self.response_logits is None:
            self.response_logits = self._logits_to_keep_works()
        base = self.model.get_base_model()
        if self.cfg.train.gradient_checkpointing and not base.is_activation_checkpointing:
            base.activation_checkpointing_enable({"use_reentrant": False})
            base.disable_input_require_grads()  # only the reentrant variant needs it

    def _logits_to_keep_works(self) -> bool:
        """True if the model's forward takes ``logits_to_keep`` as a boolean (batch, seq) mask
        (transformers' ``slice_logits_to_keep``) and gives the full forward's logits there."""
        if not self._takes_logits_to_keep:
            return False
        ids, _, mask = self._collate([([self.eos_id] * 3, [-100] * 3)])
        keep = torch.tensor([[True, False, True]], device=ids.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                part = self.model(
                    input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep
                ).logits
        except (TypeError, ValueError, IndexError, RuntimeError):
            return False
        finally:
            self.model.train(was_training)
        want = full[0, [0, 2]]
        # bfloat16 logits are 2^-8 apart relative to their size: two products of different shapes
        # may round differently there, while logits of wrong positions differ wholesale
        tol = 1e-4 if part.dtype == torch.float32 else 2e-2
        return part.shape == want.shape and torch.allclose(part.float(), want.float(), rtol=tol, atol=tol)

    def _loss_sum(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy over the response tokens (labels != -100).

        Where the model supports it, the output projection runs only at the positions whose
        next token is a response token (``logits_to_keep`` mask); otherwise on every position."""
        targets = labels[:, 1:]
        if self.response_logits:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != -100
            with self.autocast():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep
                ).logits
            return torch.nn.functional.cross_entropy(
                logits.float(), targets[keep[:, :-1]], reduction="sum"
            )
        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )

    def train_steps(self, n_examples: int, epochs: float) -> int:
        return max(1, math.ceil(epochs * n_examples / self.cfg.train.batch_size))

    # ---- inference ----------------------------------------------------------------------
    def _left_pad(self, seqs: Sequence[list[int]]):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prompt_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        limit = self.cfg.model.max_length
        return [self._ids(format_prompt(t))[-limit:] for t in instructions]

    @torch.no_grad()
    def generate(
        self,
        instructions: Sequence[str],
        mix: Mapping[str, Weight],
        progress: ProgressFn | None = None,
        batch_context: BatchContextFn | None = None,
    ) -> list[str]:
        """Greedy generation in batches (sorted by length); ``mix`` weights may be per-instance
        tensors aligned with ``instructions``."""
        ec = self.cfg.eval
        prompts = self._prompt_ids(instructions)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outs: list[str] = [""] * len(prompts)
        for s in range(0, len(order), ec.batch_size):
            idx = order[s : s + ec.batch_size]
            ids, mask = self._left_pad([prompts[i] for i in idx])
            weights = self._on_device(mix, idx)
            rows = batch_context(idx) if batch_context else contextlib.nullcontext()
            with self.adapters.mixing(weights), rows, self.autocast():
                gen = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=ec.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                )
            for j, i in enumerate(idx):
                text = self.tok.decode(gen[j, ids.shape[1] :], skip_special_tokens=True)
                outs[i] = text.split("### Instruction")[0].strip()
            if progress:
                progress(len(idx))
        return outs

    @torch.no_grad()
    def embed(
        self, instructions: Sequence[str], mix: Mapping[str, Weight],
        batch_context: BatchContextFn | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden state at the last prompt token, one row per instruction."""
        if batch_context is None and (reused := self._reuse_embeddings(instructions, mix)) is not None:
            return reused
        prompts = self._prompt_ids(instructions)
        rows: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), self.cfg.eval.batch_size):
            idx = order[s : s + self.cfg.eval.batch_size]
            ids, mask = self._left_pad([prompts[i] for i in idx])
            weights = self._on_device(mix, idx)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            selected = batch_context(idx) if batch_context else contextlib.nullcontext()
            with self.adapters.mixing(weights), selected, self.autocast():
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions,
                    output_hidden_states=True, use_cache=False, **self._last_logits_only(),
                )
            last = out.hidden_states[-1][:, -1, :]  # left padding: last column is the last token
            for j, i in enumerate(idx):
                rows[i] = last[j].float()
        return torch.stack(rows)

    def _last_logits_only(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the model takes it: an embedding pass needs hidden states,
        and the output projection over every prompt position (B x T x vocab) is wasted work."""
        return {"logits_to_keep": 1} if self._takes_logits_to_keep else {}

    @functools.cached_property
    def _takes_logits_to_keep(self) -> bool:
        """Whether the backbone's forward has a ``logits_to_keep`` argument (asked once per
        trainer; kept on the instance, so the trainer and its model are freed with it)."""
        return "logits_to_keep" in inspect.signature(self.model.get_base_model().forward).parameters

    def _on_device(self, mix: Mapping[str, Weight], idx: list[int]) -> dict[str, Weight]:
        """The batch's rows of per-instance mixing weights, on the model's device."""
        return {r: (w[idx].to(self.device) if isinstance(w, torch.Tensor) else w) for r, w in mix.items()}

    _known: tuple[dict[str, Weight], Mapping[str, torch.Tensor]] | None = None

    @contextlib.contextmanager
    def known_embeddings(self, mix: Mapping[str, float], rows: Mapping[str, torch.Tensor]):
        """Inside, :meth:`embed` under ``mix`` returns these rows (instruction -> embedding,
        computed with the adapters now loaded, e.g. in a cross-client batch) and embeds only
        the instructions not among them."""
        previous, self._known = self._known, (dict(mix), rows)
        try:
            yield
        finally:
            self._known = previous

    def _reuse_embeddings(self, instructions: Sequence[str], mix: Mapping[str, Weight]) -> torch.Tensor | None:
        known = self._known
        if known is None or any(isinstance(w, torch.Tensor) for w in mix.values()) or dict(mix) != known[0]:
            return None
        rows = dict(known[1])
        todo = [t for t in dict.fromkeys(instructions) if t not in rows]
        if todo:
            self._known = None
            try:
                rows.update(zip(todo, self.embed(todo, mix), strict=True))
            finally:
                self._known = known
        return torch.stack([rows[t] for t in instructions])


def sample_batches(n: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    """The example indices of each of ``steps`` batches: epochs of a fresh ``rng`` shuffle,
    drawn from the end, a batch running on into the next epoch's shuffle."""
    order: list[int] = []
    for _ in range(steps):
        idx: list[int] = []
        while len(idx) < min(batch_size, n):
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            idx.append(order.pop())
        yield idx


def _sq_dist(adapters: DualLoRA, roles: Sequence[str], ref: Mapping[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for role in roles:
        for k, p in adapters.params[role].items():
            total = total + (p - ref[k].to(p.device)).pow(2).sum().to(total.device)
    return total
