"""The training-speed paths compute the same thing as the plain ones (tiny model, float32):
response-only logits, zero-weight roles left out of the forward pass, length-grouped
micro-batches and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_raw

from fedblend.config import config_from_dict
from fedblend.text import synthetic
from fedblend.text.backbone import load_text_backbone
from fedblend.text.trainer import TextTrainer


def _trainer(dropout: float = 0.0, **train) -> TextTrainer:
    cfg = config_from_dict(tiny_raw(lora={"r": 4, "alpha": 8, "dropout": dropout}, train=train))
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    g = torch.Generator().manual_seed(7)
    for role in ("global", "local"):
        tr.adapters.set(role, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tr.adapters.get(role).items()})
    return tr


def _batch(tr: TextTrainer):
    """Two examples of different lengths, so the shorter one is padded."""
    data = tr.tokenize("c", synthetic.generate("parity", 1, 0) + synthetic.generate("uppercase", 1, 0))
    assert len(data[0][0]) != len(data[1][0])
    return tr._collate(data)


def _loss_and_grads(tr: TextTrainer, roles, mix, seed: int = 0):
    ids, labels, mask = _batch(tr)
    tr.adapters.set_trainable(roles)
    tr._prepare_training()
    tr.model.train()
    torch.manual_seed(seed)
    with tr.adapters.mixing(mix):
        loss = tr._loss_sum(ids, labels, mask)
        loss.backward()
    grads = {f"{r}:{k}": p.grad.clone() for r in roles for k, p in tr.adapters.params[r].items()}
    for r in roles:
        for p in tr.adapters.params[r].values():
            p.grad = None
    tr.model.eval()
    tr.adapters.set_trainable(())
    return loss.detach(), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=rtol, atol=atol)


def test_response_only_logits_equal_full_logits_loss_and_grads():
    tr = _trainer()
    mix = {"global": 0.5, "local": 0.5}
    fast = _loss_and_grads(tr, ["global", "local"], mix)
    assert tr.response_logits is True  # the tiny Llama takes a boolean logits_to_keep mask
    tr.response_logits = False
    full = _loss_and_grads(tr, ["global", "local"], mix)
    _assert_same(fast, full)
    # and the full-logits path is the loss written out by hand
    ids, labels, mask = _batch(tr)
    with torch.no_grad(), tr.adapters.mixing(mix):
        logits = tr.model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    y = labels[:, 1:]
    keep = y != -100
    by_hand = -logp[keep].gather(1, y[keep][:, None]).sum()
    torch.testing.assert_close(full[0], by_hand, rtol=1e-5, atol=1e-5)


def test_zero_weight_role_is_not_computed_and_outputs_are_unchanged():
    tr = _trainer()
    calls = {"global": 0, "local": 0}
    for layer in tr.adapters.layers:
        for role in calls:
            layer.lora_A[role].register_forward_hook(lambda *a, r=role: calls.__setitem__(r, calls[r] + 1))
    ids = torch.tensor([[5, 17, 99, 3], [8, 8, 120, 64]])
    with torch.no_grad(), tr.adapters.mixing({"global": 1.0, "local": 0.0}):
        skipped = tr.model(input_ids=ids).logits
    assert calls["local"] == 0 and calls["global"] == len(tr.adapters.layers)
    tr.adapters.skip_zero_roles = False
    with torch.no_grad(), tr.adapters.mixing({"global": 1.0, "local": 0.0}):
        computed = tr.model(input_ids=ids).logits
    tr.adapters.skip_zero_roles = True
    assert calls["local"] == len(tr.adapters.layers)
    assert torch.equal(skipped, computed)
    # restored after the context: both roles run again (the default mix weights them 1)
    assert all(layer.active_adapters == ["global", "local"] for layer in tr.adapters.layers)
    # a per-instance tensor weight, even all zero, and a trainable role are never skipped
    with tr.adapters.mixing({"global": 1.0, "local": torch.zeros(2)}):
        assert tr.adapters.layers[0].active_adapters == ["global", "local"]
    tr.adapters.set_trainable(["local"])
    with tr.adapters.mixing({"global": 1.0, "local": 0.0}):
        assert tr.adapters.layers[0].active_adapters == ["global", "local"]
    tr.adapters.set_trainable(())
    assert all(not p.requires_grad for r in ("global", "local") for p in tr.adapters.params[r].values())


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    # dropout on: the recomputation must replay the same dropout masks
    plain = _loss_and_grads(_trainer(dropout=0.2), ["global"], {"global": 0.7, "local": 0.3}, seed=5)
    tr = _trainer(dropout=0.2, gradient_checkpointing=True)
    ckpt = _loss_and_grads(tr, ["global"], {"global": 0.7, "local": 0.3}, seed=5)
    assert tr.model.get_base_model().is_activation_checkpointing
    _assert_same(plain, ckpt)


def test_length_grouping_gives_the_same_update():
    """Sorting a batch before splitting it into micro-batches changes only summation order."""
    ex = synthetic.generate("parity", 4, 0) + synthetic.generate("uppercase", 4, 0)
    tr = _trainer(batch_size=4, micro_batch_size=2)
    start = tr.adapters.get("global")
    out = {}
    for g in (True, False):
        tr.cfg.train.group_by_length = g
        tr.adapters.set("global", start)
        stats = tr.train("c", ex, ["global"], {"global": 1.0}, epochs=1, seed=3)
        out[g] = (stats["loss"], tr.adapters.get("global"))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for k, v in out[True][1].items():
        torch.testing.assert_close(v, out[False][1][k], rtol=1e-4, atol=1e-6)


def test_sample_batches_cover_each_epoch_once_and_run_on_into_the_next():
    import random

    from fedblend.text.trainer import sample_batches

    batches = list(sample_batches(5, 4, 5, random.Random(0)))  # 4 epochs of 5 in 5 batches of 4
    assert [len(b) for b in batches] == [4] * 5
    flat = [i for b in batches for i in b]
    for e in range(4):
        assert sorted(flat[5 * e : 5 * e + 5]) == list(range(5))  # every example once per epoch
    assert batches == list(sample_batches(5, 4, 5, random.Random(0)))  # seeded
    assert list(sample_batches(3, 8, 2, random.Random(1))) and all(
        sorted(b) == [0, 1, 2] for b in sample_batches(3, 8, 2, random.Random(1)))  # batch > n
