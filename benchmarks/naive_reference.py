"""A naive federated LoRA loop, written the way the published FedDPA code (built on Shepherd /
FederatedGPT) trains: the reference that ``fedblend bench`` times fedblend's round against.

Per round, for every client: the client's examples become a ``datasets.Dataset`` that is
re-tokenised with ``datasets.map``; a fresh Hugging Face ``Trainer`` (``TrainingArguments``:
micro-batch per device, gradient accumulation = batch / micro-batch, the epochs, learning
rate, linear schedule, AdamW, max grad norm; ``DataCollatorForSeq2Seq`` padding to a multiple
of 8) trains the PEFT LoRA adapter, which starts from the global weights and is saved to disk
(``save_pretrained``). The server re-loads every client's adapter file and sets their
example-weighted average (FedAvg) as the new global adapter.

Same as fedblend's ``fedit``: the model (``load_text_backbone``), the examples (fedblend's
federation), the prompt template (``format_prompt``), the token layout (response truncated
to half the sequence length plus EOS, prompt truncated from the left, loss on response tokens
only), batch, micro-batch, epochs, learning rate, schedule and sequence length.

    python benchmarks/naive_reference.py configs/flan8/fedit.toml --set train.rounds=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def fedavg_adapter_files(paths: Sequence[Path], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of saved PEFT adapters (``adapter_model.safetensors`` in each dir)."""
    from safetensors.torch import load_file

    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for path, w in zip(paths, weights, strict=True):
        for k, t in load_file(str(Path(path) / "adapter_model.safetensors")).items():
            out[k] = out[k] + t.float() * (w / total) if k in out else t.float() * (w / total)
    return out


def tokenize_fn(tok: Any, max_len: int):
    """``datasets.map`` function: fedblend's token layout (see the module docstring)."""
    from fedblend.text.backbone import format_prompt

    def fn(rec: dict[str, str]) -> dict[str, list[int]]:
        prompt = tok(format_prompt(rec["instruction"]), add_special_tokens=False)["input_ids"]
        resp = tok(rec["output"], add_special_tokens=False)["input_ids"][: max_len // 2]
        resp = resp + [tok.eos_token_id]
        prompt = prompt[-(max_len - len(resp)):]
        return {"input_ids": prompt + resp, "attention_mask": [1] * (len(prompt) + len(resp)),
                "labels": [-100] * len(prompt) + resp}

    return fn


def run_naive(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Run ``cfg.train.rounds`` naive FedAvg rounds over every client; per-round seconds (the
    whole client loop and the server's FedAvg through disk) and training losses. Hugging Face's
    ``Trainer`` sets the process-wide transformers log level from ``log_level``; it is put back
    afterwards, so the rest of the process logs as before."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        return _run_naive(cfg, workdir)
    finally:
        hf_logging.set_verbosity(verbosity)


def _run_naive(cfg: Any, workdir: Path) -> dict[str, Any]:
    import datasets
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.federation import build_federation

    datasets.disable_progress_bars()
    tc, lc = cfg.train, cfg.lora
    fed = build_federation(cfg)
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    model = get_peft_model(model, LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
        bias="none", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    global_w = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    collator = DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    micro = min(tc.micro_batch_size, tc.batch_size)
    rounds = []
    for rnd in range(tc.rounds):
        t0 = time.perf_counter()
        saved, sizes, losses = [], [], {}
        for client in fed.clients:
            ds = datasets.Dataset.from_list(
                [{"instruction": e.instruction, "output": e.output} for e in client.train])
            ds = ds.shuffle(seed=cfg.seed + rnd).map(
                tokenize_fn(tok, cfg.model.max_length), remove_columns=["instruction", "output"])
            set_peft_model_state_dict(model, global_w)
            args = TrainingArguments(
                output_dir=str(workdir / "trainer"), per_device_train_batch_size=micro,
                gradient_accumulation_steps=max(1, tc.batch_size // micro),
                num_train_epochs=tc.local_epochs, learning_rate=tc.lr,
                lr_scheduler_type="linear" if tc.scheduler == "linear" else "constant",
                warmup_steps=tc.warmup_ratio, weight_decay=tc.weight_decay, optim="adamw_torch",
                max_grad_norm=tc.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
                disable_tqdm=True, use_cpu=True, bf16=cfg.model.dtype == "bfloat16", seed=cfg.seed + rnd * 1000 + client.cid,
                dataloader_num_workers=0, log_level="error")
            trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
            trainer.remove_callback(PrinterCallback)
            out = trainer.train()
            losses[client.cid] = float(out.training_loss)
            path = workdir / f"round_{rnd}" / f"client_{client.cid}"
            model.save_pretrained(str(path))
            saved.append(path)
            sizes.append(len(client.train))
        global_w = fedavg_adapter_files(saved, sizes)  # server: adapters back from disk
        set_peft_model_state_dict(model, global_w)
        rounds.append({"round": rnd, "seconds": time.perf_counter() - t0,
                       "loss": sum(losses.values()) / len(losses), "client_loss": losses})
    return {"rounds": rounds, "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
            "final_loss": rounds[-1]["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override section.key=value")
    ap.add_argument("--out", type=Path, default=Path("runs/naive_reference"))
    args = ap.parse_args()

    from fedblend.config import load_config
    from fedblend.runlog import third_party_to

    cfg = load_config(args.config, args.sets)
    args.out.mkdir(parents=True, exist_ok=True)
    with third_party_to(args.out / "run.log"), open(args.out / "stdout.log", "a") as f, \
            contextlib.redirect_stdout(f):
        result = run_naive(cfg, args.out)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    for r in result["rounds"]:
        print(f"round {r['round']}: {r['seconds']:.1f} s, loss {r['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
