from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from fedblend.config import config_from_dict
from fedblend.text import synthetic
from fedblend.text.backbone import load_text_backbone
from fedblend.text.trainer import TextTrainer


@pytest.fixture
def trainer() -> TextTrainer:
    cfg = config_from_dict(tiny_raw(lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    tr.adapters.set("global", _randomized(tr.adapters.get("global"), 1))
    tr.adapters.set("local", _randomized(tr.adapters.get("local"), 2))
    return tr


def _randomized(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tensors.items()}


def _inputs():
    return torch.tensor([[5, 17, 99, 3, 42, 7], [8, 8, 120, 64, 2, 11]])


def _plain_peft_logits(tr: TextTrainer, role: str) -> torch.Tensor:
    """The same backbone wrapped by plain PEFT with one adapter holding the role's tensors."""
    cfg = tr.cfg
    base, _ = load_text_backbone(cfg.model, seed=0)
    plain = get_peft_model(base, PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                target_modules=cfg.lora.target_modules))
    own = {n.replace(".default.", "."): p for n, p in plain.named_parameters() if ".default." in n}
    with torch.no_grad():
        for k, t in tr.adapters.get(role).items():
            own[k].copy_(t)
    plain.eval()
    return plain(input_ids=_inputs()).logits


def _dual_logits(tr: TextTrainer, mix) -> torch.Tensor:
    with torch.no_grad(), tr.adapters.mixing(mix):
        return tr.model(input_ids=_inputs()).logits


def test_mixing_parity_with_plain_peft(trainer: TextTrainer):
    """w_l = 0 equals plain PEFT LoRA with the global adapter; w_g = 0 equals the local one."""
    torch.testing.assert_close(_dual_logits(trainer, {"global": 1.0, "local": 0.0}),
                               _plain_peft_logits(trainer, "global"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_dual_logits(trainer, {"global": 0.0, "local": 1.0}),
                               _plain_peft_logits(trainer, "local"), rtol=1e-5, atol=1e-5)
    both = _dual_logits(trainer, {"global": 1.0, "local": 1.0})
    assert not torch.allclose(both, _plain_peft_logits(trainer, "global"), atol=1e-4)


def test_per_instance_weights_match_per_instance_runs(trainer: TextTrainer):
    w = torch.tensor([0.8, 0.1])
    mixed = _dual_logits(trainer, {"global": 1 - w, "local": w})
    for i in range(2):
        single = _dual_logits(trainer, {"global": float(1 - w[i]), "local": float(w[i])})
        torch.testing.assert_close(mixed[i], single[i], rtol=1e-5, atol=1e-5)


def test_mixing_context_restores_weights(trainer: TextTrainer):
    before = _dual_logits(trainer, {"global": 1.0})
    with trainer.adapters.mixing({"local": torch.tensor([0.3, 0.3])}):
        pass
    torch.testing.assert_close(_dual_logits(trainer, {"global": 1.0}), before)
    layer = trainer.adapters.layers[0]
    assert layer.scaling["global"] == pytest.approx(trainer.adapters.scale["global"])


def test_stop_gradient_keeps_frozen_adapter(trainer: TextTrainer):
    g0, l0 = trainer.adapters.get("global"), trainer.adapters.get("local")
    ex = synthetic.generate("parity", 8, 0)
    trainer.train("c", ex, ["local"], {"global": 0.5, "local": 0.5}, epochs=2, seed=0)
    g1, l1 = trainer.adapters.get("global"), trainer.adapters.get("local")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert any(not torch.equal(l0[k], l1[k]) for k in l0)
    # and the frozen adapter never even receives a gradient
    trainer.adapters.set_trainable(["local"])
    with trainer.adapters.mixing({"global": 0.5, "local": 0.5}):
        trainer.model(input_ids=_inputs()).logits.sum().backward()
    assert all(p.grad is None for p in trainer.adapters.params["global"].values())
    assert all(p.grad is not None for p in trainer.adapters.params["local"].values())
    trainer.adapters.set_trainable(())


def test_export_loads_with_peft(trainer: TextTrainer, tmp_path: Path):
    out = trainer.adapters.export("local", trainer.adapters.get("local"), tmp_path / "local_adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base, _ = load_text_backbone(trainer.cfg.model, seed=0)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out)
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=_inputs()).logits
    torch.testing.assert_close(got, _dual_logits(trainer, {"local": 1.0}), rtol=1e-5, atol=1e-5)


def test_fresh_adapter_is_seeded_and_zero_at_start(trainer: TextTrainer):
    a = trainer.adapters.fresh("global", 5)
    b = trainer.adapters.fresh("global", 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if "lora_B" in k)
