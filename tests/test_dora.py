"""DoRA (``lora.dora = true``): the magnitude vector m beside each role's A and B, its init,
its mixed forward, where each method keeps it (shared and averaged, or local) and its export."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_raw
from peft import PeftModel

from fedblend.adapters.lora import MAGNITUDE, DualLoRA, split_kinds, tensor_kind
from fedblend.aggregation.fedavg import weighted_mean
from fedblend.aggregation.validate import problem
from fedblend.algorithms.fedit import FedIT
from fedblend.comm import compress as cz
from fedblend.comm.codec import Message, decode
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import run_experiment
from fedblend.store.files import load_state
from fedblend.text.backbone import load_text_backbone
from fedblend.text.batched_eval import batchable
from fedblend.text.trainer import TextTrainer

DORA = {"r": 4, "alpha": 8, "dropout": 0.0, "dora": True}


@pytest.fixture
def trainer() -> TextTrainer:
    cfg = config_from_dict(tiny_raw(lora=DORA))
    model, tok = load_text_backbone(cfg.model, seed=0)
    return TextTrainer(cfg, model, tok)


def _randomized(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1 + (v if tensor_kind(k) == MAGNITUDE else 0))
            for k, v in tensors.items()}


def _magnitudes(tensors):
    return {k: t for k, t in tensors.items() if tensor_kind(k) == MAGNITUDE}


def _inputs():
    return torch.tensor([[5, 17, 99, 3, 42, 7], [8, 8, 120, 64, 2, 11]])


def test_magnitude_starts_at_the_row_norm_of_w0_and_fresh_resets_it(trainer: TextTrainer):
    ad = trainer.adapters
    created = ad.get("global")
    mags = _magnitudes(created)
    assert len(mags) == len(ad.layers) and all(t.dim() == 1 for t in mags.values())
    for layer in ad.layers:
        w0 = layer.get_base_layer().weight
        m = layer.lora_magnitude_vector["global"].weight
        assert m.shape == (w0.shape[0],) and m.requires_grad is False  # trainable only in train()
        assert torch.equal(m.detach(), torch.linalg.norm(w0, dim=1))  # nn.Linear: one norm per output row
    ad.set("global", _randomized(created, 1))
    again = ad.fresh("global", 5)
    assert all(torch.equal(again[k], created[k]) for k in mags)  # as PEFT's creation set it
    assert all(torch.count_nonzero(v) == 0 for k, v in again.items() if tensor_kind(k) == "lora_B")


def test_mixed_dora_forward_is_the_documented_formula(trainer: TextTrainer):
    """PEFT runs the active roles in turn (global, then local); each DoRA step maps the output
    so far, h, to ``c_k (h + s w_k B_k A_k x)`` with ``c_k = m_k / ||W0 + s w_k B_k A_k||`` per
    output row (w_k inside the norm): h = c_l (c_g (W0 + s w_g B_g A_g) x + s w_l B_l A_l x)."""
    ad = trainer.adapters
    ad.set("global", _randomized(ad.get("global"), 1))
    ad.set("local", _randomized(ad.get("local"), 2))
    layer = ad.layers[0]
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    s = ad.scale["global"]
    w0 = layer.get_base_layer().weight.double()
    xd = x.double()

    def step(h, role, w):
        a, b = layer.lora_A[role].weight.double(), layer.lora_B[role].weight.double()
        m = layer.lora_magnitude_vector[role].weight.double()
        c = m / torch.linalg.norm(w0 + s * w * b @ a, dim=1)
        return c * (h + s * w * (xd @ a.T @ b.T))

    for mix in ({"global": 0.3, "local": 0.7}, {"global": 1.0}, {"global": 1.0, "local": 0.0}):
        with torch.no_grad(), ad.mixing(mix):
            got = layer(x).double()
        want = xd @ w0.T
        for role in ad.roles:
            if mix.get(role, 0.0) != 0:
                want = step(want, role, mix[role])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ad.skip_zero_roles = False  # a role at weight 0 must still play no part under DoRA
    with torch.no_grad(), ad.mixing({"global": 1.0, "local": 0.0}):
        got = layer(x).double()
    torch.testing.assert_close(got, step(xd @ w0.T, "global", 1.0), rtol=1e-5, atol=1e-5)


def test_export_loads_in_peft_with_the_same_logits(trainer: TextTrainer, tmp_path: Path):
    ad = trainer.adapters
    tensors = _randomized(ad.get("global"), 3)
    out = ad.export("global", tensors, tmp_path / "dora_adapter")
    base, _ = load_text_backbone(trainer.cfg.model, seed=0)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out)
    loaded.eval()
    assert loaded.peft_config["default"].use_dora
    ad.set("global", tensors)
    with torch.no_grad(), ad.mixing({"global": 1.0}):
        want = trainer.model(input_ids=_inputs()).logits
        got = loaded(input_ids=_inputs()).logits
        plain = base(input_ids=_inputs()).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter (m included) matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _run(tmp_path: Path, algo: str, rounds: int = 2, weighting: str = "global"):
    sent = []
    cfg = config_from_dict(tiny_raw(
        algorithm=algo, lora=DORA, train={"rounds": rounds},
        data={"synthetic_test_per_task": 2}, eval={"ttp": False, "max_new_tokens": 1},
        **({"feddpa": {"weighting": weighting}} if algo.startswith("feddpa") else {}),
    ))
    run_experiment(cfg, tmp_path / algo, tap=lambda *a: sent.append(a))
    clients = {int(p.stem): load_state(p) for p in (tmp_path / algo / "final" / "clients").glob("*.safetensors")}
    server = load_state(tmp_path / algo / "final" / "server.safetensors")
    return cfg, [(d, r, c, decode(data)) for d, r, c, data in sent], clients, server


def _ups(msgs, role):
    last = max(r for d, r, _, _ in msgs if d == "up")
    return [(m.tensors[role], float(m.num_examples)) for d, r, _, m in msgs if d == "up" and r == last]


def _initial(cfg, role="global"):
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    return TextTrainer(cfg, model, tok).adapters.fresh(role, cfg.seed)


def test_fedit_trains_m_and_averages_it_by_examples(tmp_path: Path):
    cfg, msgs, _, server = _run(tmp_path, "fedit", rounds=1)
    ups = _ups(msgs, "global")
    assert len(ups) == 3
    mags = [_magnitudes(t) for t, _ in ups]
    init = _magnitudes(_initial(cfg))
    assert set(mags[0]) == set(init) and len(init) > 0  # m travels with A and B ...
    assert all(any(not torch.equal(m[k], init[k]) for k in init) for m in mags)  # ... is trained ...
    assert any(not torch.equal(mags[0][k], mags[1][k]) for k in init)
    torch.testing.assert_close(server["global"], weighted_mean(ups))
    # ... and averaged with the example counts: two clients' tensors through FedIT's aggregate
    algo = FedIT(cfg)
    updates = {0: Message({"global": ups[0][0]}, 3), 1: Message({"global": ups[1][0]}, 9)}
    new = algo.aggregate(1, updates, {"global": ups[2][0]})["global"]
    for k in init:
        want = (3 * mags[0][k].double() + 9 * mags[1][k].double()) / 12
        torch.testing.assert_close(new[k].double(), want, rtol=1e-6, atol=1e-7)
    # bytes_up counts what travels: every upload carries d_out float32 numbers per layer more
    up = next(m for d, _, _, m in msgs if d == "up")
    without = Message({"global": {k: t for k, t in up.tensors["global"].items() if k not in init}},
                      up.num_examples, up.metrics, up.config)
    assert up.num_bytes() - without.num_bytes() >= 4 * sum(t.numel() for t in init.values())


def test_feddpa_keeps_the_local_magnitude_private(tmp_path: Path):
    cfg, msgs, clients, server = _run(tmp_path, "feddpa_t", weighting="static")
    for _, _, _, msg in msgs:
        assert set(msg.tensors) <= {"global"}
    init_local = _magnitudes(_initial(cfg, "local"))
    sent = [_magnitudes(m.tensors["global"]) for d, _, _, m in msgs if d == "up"]
    assert sent and all(set(s) == set(init_local) for s in sent)  # G's own m is shared
    for st in clients.values():
        own = _magnitudes(st["local"])
        assert set(own) == set(init_local)
        assert any(not torch.equal(own[k], init_local[k]) for k in own)  # L's m trained ...
        assert all(not torch.equal(own[k], s[k]) for s in sent for k in own)  # ... and never sent
    torch.testing.assert_close(server["global"], weighted_mean(_ups(msgs, "global")))


def test_refusals_name_the_key():
    """FedDPA's dynamic weighting, FedDPA-T's mixed training with dropout, FedALT's per-token
    router and the vision methods (no LoRA) refuse lora.dora at load time, in one line naming
    the key."""
    cases = [
        (tiny_raw(algorithm="feddpa_t", lora=DORA), r"^config: lora\.dora: .*dynamic"),
        (tiny_raw(algorithm="feddpa_f", lora=DORA, feddpa={"finetune_epochs": 1}), r"^config: lora\.dora: .*dynamic"),
        (tiny_raw(algorithm="feddpa_t", lora={**DORA, "dropout": 0.05}, feddpa={"weighting": "static"}),
         r"^config: lora\.dropout: "),
        ({**tomllib.loads((ROOT / "configs" / "tiny" / "clip_smoke.toml").read_text()), "lora": {"dora": True}},
         r"^config: lora\.dora: tripleplay trains no LoRA"),
        (tiny_raw(algorithm="fedalt", lora=DORA), r"^config: lora\.dora: fedalt's router"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)
    # FedDPA-F trains one adapter at a time (its dropout is PEFT's plain DoRA), FedDPA-T without dropout
    config_from_dict(tiny_raw(algorithm="feddpa_f", lora={**DORA, "dropout": 0.05},
                              feddpa={"weighting": "static", "finetune_epochs": 1}))
    config_from_dict(tiny_raw(algorithm="feddpa_t", lora=DORA, feddpa={"weighting": "static"}))


def test_split_kinds_keeps_m_with_b(trainer: TextTrainer):
    """FedSA-LoRA keeps B (and m) local, FFA-LoRA trains and shares B (and m)."""
    parts = split_kinds(trainer.adapters.get("global"))
    assert not _magnitudes(parts["lora_A"]) and _magnitudes(parts["lora_B"])
    trainer.adapters.set_trainable(["global"], frozen=("lora_A",))  # FFA-LoRA's training
    trainable = {id(p) for p in trainer.adapters.trainable_parameters()}
    mags = [p for k, p in trainer.adapters.params["global"].items() if tensor_kind(k) == MAGNITUDE]
    assert mags and all(id(p) in trainable for p in mags)


def test_compression_and_validation_take_one_dimensional_tensors(trainer: TextTrainer):
    received = Message({"global": trainer.adapters.get("global")})
    update = Message({"global": _randomized(received.tensors["global"], 4)}, num_examples=3)
    for scheme in cz.SCHEMES:
        small, residual = cz.compress(update, received, scheme, {})
        full = cz.decompress(small, received.tensors)
        for k, t in _magnitudes(update.tensors["global"]).items():
            assert full.tensors["global"][k].shape == t.shape
            torch.testing.assert_close(full.tensors["global"][k] + residual[f"global/{k}"], t)
        assert problem(full, received.tensors, ("global",), 0.0) is None
    k = next(iter(_magnitudes(update.tensors["global"])))
    bad = {**update.tensors["global"], k: update.tensors["global"][k][:-1]}
    assert "shape" in problem(Message({"global": bad}), received.tensors, ("global",), 0.0)


def test_cross_client_batching_falls_back_with_dora(trainer: TextTrainer):
    """Client after client (batchable False) with DoRA; plain LoRA still batches."""
    assert not batchable(trainer, {c: {"global": trainer.adapters.get("global")} for c in range(2)})
    plain = config_from_dict(tiny_raw())
    lora = TextTrainer(plain, *load_text_backbone(plain.model, seed=0))
    assert batchable(lora, {c: {"global": lora.adapters.get("global")} for c in range(2)})


def test_dora_adapters_hold_d_out_more_numbers_per_layer(trainer: TextTrainer):
    plain = config_from_dict(tiny_raw(lora={**DORA, "dora": False}))
    model, _ = load_text_backbone(plain.model, seed=0)
    lora = DualLoRA(model, plain.lora)
    extra = sum(layer.out_features for layer in trainer.adapters.layers)
    assert trainer.adapters.num_parameters("global") == lora.num_parameters("global") + extra


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dora_on_a_quantized_backbone_starts_from_the_dequantised_w0(quant):
    from peft.utils.integrations import dequantize_module_weight

    cfg = config_from_dict(tiny_raw(model={"quantization": quant, "device": "cpu"}, lora=DORA))
    tr = TextTrainer(cfg, *load_text_backbone(cfg.model, cfg.seed))
    layer = tr.adapters.layers[0]
    assert type(layer.get_base_layer()).__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    created = tr.adapters.get("global")
    w0 = dequantize_module_weight(copy.deepcopy(layer.get_base_layer())).float()
    assert torch.equal(layer.lora_magnitude_vector["global"].weight.detach(), torch.linalg.norm(w0, dim=1))
    tr.adapters.set("global", _randomized(created, 1))
    again = tr.adapters.fresh("global", 1)
    assert all(torch.equal(again[k], created[k]) for k in _magnitudes(created))
    tr.adapters.set_trainable(["global"])
    with tr.adapters.mixing({"global": 1.0}):
        tr.model(input_ids=_inputs()).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for k, p in tr.adapters.params["global"].items() if tensor_kind(k) == MAGNITUDE)
