"""FedSA-LoRA and FFA-LoRA: which LoRA factor travels, which stays, which trains."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_raw

from fedblend.adapters.lora import split_kinds
from fedblend.aggregation.fedavg import weighted_mean
from fedblend.comm.codec import decode
from fedblend.config import config_from_dict
from fedblend.runner import run_experiment
from fedblend.store.files import load_state
from fedblend.text.backbone import load_text_backbone
from fedblend.text.trainer import TextTrainer


def _run(tmp_path: Path, algo: str):
    sent: list[tuple[str, int, int, bytes]] = []
    cfg = config_from_dict(tiny_raw(algorithm=algo))
    summary = run_experiment(cfg, tmp_path / algo, tap=lambda *a: sent.append(a))
    clients = {int(p.stem): load_state(p) for p in (tmp_path / algo / "final" / "clients").glob("*.safetensors")}
    server = load_state(tmp_path / algo / "final" / "server.safetensors")
    return cfg, summary, [(d, r, c, decode(data)) for d, r, c, data in sent], clients, server


def _kinds(msg) -> set[str]:
    return {k.split(".lora_")[1][0] for ts in msg.tensors.values() for k in ts}


def test_fedsa_lora_shares_a_and_keeps_b(tmp_path: Path):
    _, summary, msgs, clients, server = _run(tmp_path, "fedsa_lora")
    assert set(clients) == {0, 1, 2} and msgs
    for _, _, _, msg in msgs:  # only A matrices ever cross the wire, either way
        assert set(msg.tensors) <= {"lora_A"} and _kinds(msg) <= {"A"}
    b = [clients[c]["lora_B"] for c in sorted(clients)]
    assert all(set(st) == {"lora_B"} for st in clients.values())
    assert all(".lora_B." in k for k in b[0])
    # B is personal: trained on each client's own task, different everywhere, never sent
    assert any(not torch.equal(b[0][k], b[1][k]) for k in b[0])
    assert all(t.abs().sum() > 0 for t in b[0].values())
    # A is the example-weighted mean of the last round's uploads
    last = max(r for d, r, _, _ in msgs if d == "up")
    ups = [(m.tensors["lora_A"], float(m.num_examples)) for d, r, _, m in msgs if d == "up" and r == last]
    assert len(ups) == 3
    avg = weighted_mean(ups)
    assert all(torch.allclose(server["lora_A"][k], avg[k]) for k in avg)
    assert summary["comm"]["shared_roles"] == ["lora_A"]
    assert set(summary["adapters"]["local"]) == {"0", "1", "2"}  # one personal adapter each


def test_ffa_lora_freezes_a_and_averages_b(tmp_path: Path, monkeypatch):
    calls = []
    original = TextTrainer.train

    def spy(self, key, examples, trainable, mix, epochs, seed, **kw):
        before = self.adapters.get("global")
        stats = original(self, key, examples, trainable, mix, epochs, seed, **kw)
        calls.append((before, self.adapters.get("global")))
        return stats

    monkeypatch.setattr(TextTrainer, "train", spy)
    cfg, summary, msgs, clients, server = _run(tmp_path, "ffa_lora")
    assert len(calls) == 2 * 3
    for before, after in calls:  # training moves B only
        kinds_b, kinds_a = split_kinds(before), split_kinds(after)
        assert all(torch.equal(kinds_b["lora_A"][k], kinds_a["lora_A"][k]) for k in kinds_b["lora_A"])
        assert any(not torch.equal(kinds_b["lora_B"][k], kinds_a["lora_B"][k]) for k in kinds_b["lora_B"])
    for _, _, _, msg in msgs:  # A never travels, not even in round 0: it comes from the seed
        assert set(msg.tensors) <= {"lora_B"} and _kinds(msg) <= {"B"}
    a = [clients[c]["lora_A"] for c in sorted(clients)]
    assert all(torch.equal(a[0][k], other[k]) for other in a[1:] for k in a[0])
    # ... and equals the seeded PEFT init a fresh process derives on its own
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    fresh = split_kinds(TextTrainer(cfg, model, tok).adapters.fresh("global", cfg.seed))["lora_A"]
    assert all(torch.equal(a[0][k], fresh[k]) for k in fresh)
    last = max(r for d, r, _, _ in msgs if d == "up")
    ups = [(m.tensors["lora_B"], float(m.num_examples)) for d, r, _, m in msgs if d == "up" and r == last]
    avg = weighted_mean(ups)
    assert all(torch.allclose(server["lora_B"][k], avg[k]) for k in avg)
    assert summary["comm"]["shared_roles"] == ["lora_B"]
    assert summary["time"]["generated_instances"] == 9  # one shared model: generated once per test instance
