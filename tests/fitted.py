"""A tiny causal LM fitted to the built-in synthetic tasks, for tests that compare text scores.

The tiny *random* model (``model.source = "tiny"``) generates an empty string for every test
instance, so P and TTP are 0.0 and a "same scores" assertion compares 0 with 0. This model
answers: a byte-level BPE tokenizer trained on synthetic-task text (so a word is one token
and 4-6 new tokens hold a whole answer) and a 2-layer Llama fitted for a few hundred steps.
It is partly right (parity, first words of reversed / capitalised lists), so ROUGE-L is
above 0 and a short LoRA fine-tune changes some answers: methods and clients differ.

Saved with ``save_pretrained`` and loaded by configs through ``model.source = "path"``
(``fitted_overrides``), so in-process runs and Flower nodes load the same weights. Built once
per cache root (about 15 CPU-seconds), under a directory keyed by a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

RECIPE = {
    "data_seed": 424242,  # far from the seeds configs use for train (seed) and test (seed + 1000003)
    "per_task": 300,
    "vocab": 400,
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "steps": 300,
    "batch": 32,
    "lr": 1e-2,
    "seed": 0,
}


def _key() -> str:
    import tokenizers
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "format": 1}
    blob = json.dumps({"recipe": RECIPE, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _examples():
    from fedblend.text import synthetic

    return [e for t in synthetic.TASKS for e in synthetic.generate(t, RECIPE["per_task"], RECIPE["data_seed"])]


def _tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab"], special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def _fit(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from fedblend.text.backbone import format_prompt

    examples = _examples()
    tok = _tokenizer([format_prompt(e.instruction) + e.output for e in examples])
    mc = LlamaConfig(
        vocab_size=len(tok), hidden_size=RECIPE["hidden"], intermediate_size=2 * RECIPE["hidden"],
        num_hidden_layers=RECIPE["layers"], num_attention_heads=RECIPE["heads"],
        num_key_value_heads=RECIPE["heads"], max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    encoded = []
    for e in examples:  # loss on the response (and its end) only, as the trainer does
        p = tok(format_prompt(e.instruction), add_special_tokens=False)["input_ids"]
        r = tok(e.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        encoded.append((p + r, [-100] * len(p) + r))
    rng = random.Random(RECIPE["seed"])
    threads = torch.get_num_threads()
    # one thread: these matrices are too small to share, and two threads on a busy 2-core
    # machine ran 15x slower than one
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(RECIPE["seed"])
        model = LlamaForCausalLM(mc)
        opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"])
        model.train()
        b = RECIPE["batch"]
        for _ in range(RECIPE["steps"]):
            batch = rng.sample(encoded, b)
            w = max(len(x) for x, _ in batch)
            ids = torch.full((b, w), tok.pad_token_id)
            labels = torch.full((b, w), -100)
            mask = torch.zeros((b, w), dtype=torch.long)
            for i, (x, y) in enumerate(batch):
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(y)] = torch.tensor(y)
                mask[i, : len(x)] = 1
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    torch.set_num_threads(threads)
    model.eval()
    hf_logging.disable_progress_bar()
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)


def fitted_model_dir(root: Path) -> Path:
    """The fitted model's directory under ``root`` (built there on first use)."""
    target = Path(root) / f"fitted-{_key()}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-fit-"))
    try:
        _fit(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# LoRA's learning rate on the fitted model: at the tiny configs' 5e-3, two rounds of a few
# steps changed no answer (local, fedit and feddpa_t gave identical predictions); at 5e-2 about
# half of them differ between local and fedit, a few between fedit and feddpa_t (measured)
LORA_LR = 5e-2


def fitted_overrides(path: Path) -> list[str]:
    """``--set`` overrides that make a tiny config load the fitted model."""
    return ["model.source='path'", f"model.path='{path}'", f"train.lr={LORA_LR}"]


def fitted_sections(path: Path) -> dict:
    """The same for :func:`conftest.tiny_raw`."""
    return {"model": {"source": "path", "path": str(path)}, "train": {"lr": LORA_LR}}
