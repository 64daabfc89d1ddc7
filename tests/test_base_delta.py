"""DualLoRA.set_base_delta: W = W0 + delta in the base layer's own layout, idempotent."""

from __future__ import annotations

import pytest
import torch

from fedblend.adapters.lora import DualLoRA
from fedblend.config import LoraConfig


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50))


@pytest.mark.parametrize("build,target", [(_gpt2, "c_attn"), (_llama, "v_proj")])
def test_delta_is_added_in_the_layers_own_layout(build, target) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: Conv1D needs fan_in_fan_out (it sets it itself)
        dual = DualLoRA(build(), LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=[target]))
    (prefix, layer), = dual.base_layers().items()
    base = layer.get_base_layer()
    x = torch.randn(3, 16)
    with torch.no_grad(), dual.mixing({}):  # no LoRA: the base layer alone
        y0 = layer(x)
        d_out = y0.shape[-1]
        delta = torch.randn(d_out, 16)  # nn.Linear layout, d_out x d_in, whatever the layer stores
        dual.set_base_delta({prefix: delta})
        dual.set_base_delta({prefix: delta})  # idempotent: W0 + delta, not W0 + 2 delta
        assert torch.allclose(layer(x), y0 + x @ delta.T, atol=1e-5)
        file = dual.base_delta_file({prefix: delta})
        name, stored = next(iter(file.items()))
        assert name == prefix.removeprefix("base_model.model.") + ".weight"
        assert stored.shape == base.weight.shape  # Conv1D: d_in x d_out
        dual.set_base_delta({})  # back to W0
        assert torch.allclose(layer(x), y0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown layers"):
        dual.set_base_delta({"nope": delta})
