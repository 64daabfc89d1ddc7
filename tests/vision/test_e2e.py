"""End-to-end runs through ``run_experiment``: the tiny-CLIP smoke config (seconds, no shared
data) and, marked e2e, EfficientNet-Lite0 on a slice of the real CIFAR-10."""

from __future__ import annotations

import json

import pytest
import torch

from fedblend.config import load_config
from fedblend.runner import run_experiment

from .conftest import CIFAR, REPO


def _smoke(tmp_path, *overrides):
    return load_config(REPO / "configs" / "tiny" / "clip_smoke.toml",
                       [f"vision.cache_dir='{tmp_path / 'cache'}'", "engine.progress=false", *overrides])


def test_tiny_clip_tripleplay_writes_summary(tmp_path):
    out = tmp_path / "run"
    s = run_experiment(_smoke(tmp_path), out)
    on_disk = json.loads((out / "summary.json").read_text())
    acc = on_disk["accuracy"]
    for key in ("overall", "head", "medium", "tail", "unseen_domain", "per_client"):
        assert key in acc
    assert 0.0 <= acc["overall"] <= 1.0
    assert set(acc["per_client"]) == {"0", "1", "2"}
    assert on_disk["memory"]["backbone_bytes"] > 0 and on_disk["memory"]["peak_rss_mb"] > 0
    # adapter and generator both travel, and the bytes are counted per round
    assert s["comm"]["shared_roles"] == ["global", "generator"]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all(r["bytes_up"] > 0 for r in rounds)
    assert s["comm"]["adapter_params"]["generator"] > 0
    assert rounds[1]["client_metrics"]["0"]["synthetic"] > 0  # GAN top-up after warm-up
    assert len(s["accuracy_per_round"]) == 2
    assert "accuracy per class" in (out / "report.html").read_text()
    assert s["time"]["feature_cache"]["used"]


def test_tiny_clip_zeroshot_and_local_send_no_tensors(tmp_path):
    from fedblend.comm.codec import decode

    for alg in ("zeroshot", "local_adapter"):
        sent: list[bytes] = []
        run_experiment(_smoke(tmp_path, f"algorithm='{alg}'"), tmp_path / alg,
                       tap=lambda d, r, c, b, sent=sent: sent.append(b) if d == "up" else None)
        assert len(sent) == 6  # 3 clients x 2 rounds, each an empty message
        assert all(decode(b).tensors == {} for b in sent), alg


def test_tiny_clip_domain_federation_reports_unseen(tmp_path):
    s = run_experiment(_smoke(tmp_path, "vision.federation='domain'", "algorithm='fedclip'",
                              "tripleplay.gan=false", "train.rounds=1"), tmp_path / "d")
    assert s["accuracy"]["unseen_domain"] is not None
    assert s["data"]["unseen_test"] == s["data"]["global_test"]


def test_resume_continues_a_vision_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fedblend.engines import inprocess
    from fedblend.store.rundir import RunDir

    cfg = _smoke(tmp_path, "algorithm='fedclip'", "tripleplay.gan=false", "train.rounds=3")
    whole = run_experiment(cfg, tmp_path / "whole")
    original = inprocess.Transport.up

    def crash_in_round_2(self, rnd, cid, msg, allowed):
        if rnd == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self, rnd, cid, msg, allowed)

    monkeypatch.setattr(inprocess.Transport, "up", crash_in_round_2)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["rounds_completed"] == 2
    monkeypatch.setattr(inprocess.Transport, "up", original)
    s = run_experiment(cfg, out, resume=True)
    assert s["resumed_at_round"] == 2 and RunDir(out).complete
    # the resumed run ends where the uninterrupted one does
    assert s["accuracy_per_round"] == whole["accuracy_per_round"] and len(s["accuracy_per_round"]) == 3
    assert s["accuracy"] == whole["accuracy"] and s["comm"] == whole["comm"]
    a = load_file(str(out / "adapters" / "global" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "whole" / "adapters" / "global" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/data/cifar10 not present")
def test_efficientnet_on_real_cifar10(tmp_path):
    from fedblend.config import config_from_dict

    cfg = config_from_dict({
        "algorithm": "fedavg_adapter", "seed": 0,
        "data": {"num_clients": 2, "partitioner": "iid"},
        "train": {"rounds": 2, "local_epochs": 2, "lr": 3e-3, "batch_size": 32},
        "engine": {"progress": False},
        "vision": {"backbone": "efficientnet_lite0", "dir": str(CIFAR), "image_size": 32,
                   "n_max": 30, "test_per_class": 10, "own_test_size": 20,
                   "cache_dir": str(tmp_path / "cache")},
    })
    s = run_experiment(cfg, tmp_path / "run")
    assert s["data"]["train_class_counts"] == [30] * 10
    assert s["accuracy"]["overall"] > 0.15  # ImageNet features beat chance (0.10) after 2 rounds


def test_personal_fedclip_keeps_a_private_adapter(tmp_path):
    from fedblend.comm.codec import decode
    from fedblend.store.files import load_state
    from fedblend.store.rundir import RunDir

    sent: list[bytes] = []
    out = tmp_path / "p"
    run_experiment(_smoke(tmp_path, "algorithm='fedclip'", "tripleplay.gan=false", "vision.personal=true"),
                   out, tap=lambda d, r, c, b: sent.append(b) if d == "up" else None)
    assert sent and all(list(decode(b).tensors) == ["global"] for b in sent)
    state = load_state(out / "clients" / "0.safetensors")
    assert set(state) == {"local"}
    g = load_state(RunDir(out).checkpoint_dir() / "server.safetensors")["global"]
    assert any(not torch.equal(state["local"][k], g[k]) for k in g)


def test_tripleplay_qlora_runs_on_full_forward_passes(tmp_path):
    s = run_experiment(_smoke(tmp_path, "vision.nf4=true", "vision.lora=true", "train.rounds=1",
                              "tripleplay.warmup_rounds=0"), tmp_path / "q")
    assert s["time"]["feature_cache"] == {"used": False, "hits": 0, "misses": 0}
    assert s["memory"]["nf4"] is True
    assert s["accuracy"]["overall"] is not None
    from safetensors.torch import load_file

    shared = load_file(str(tmp_path / "q" / "adapters" / "global" / "adapter.safetensors"))
    assert any(k.startswith("lora.") for k in shared)  # LoRA travels with the adapter
    assert any(k.startswith("adapter.") for k in shared)


def test_zeroshot_without_text_tower_is_a_config_error(tmp_path):
    from fedblend.config import config_from_dict
    from fedblend.errors import ConfigError

    raw = {"algorithm": "zeroshot", "engine": {"progress": False},
           "vision": {"backbone": "efficientnet_lite0", "dataset": "synthetic", "image_size": 32, "cache_dir": ""},
           "data": {"num_clients": 2}}
    with pytest.raises(ConfigError, match="vision.backbone: zeroshot needs a CLIP backbone"):
        config_from_dict(raw)  # refused when the config loads, before any run directory exists
    assert not (tmp_path / "z").exists()


def test_reevaluating_a_vision_run_reproduces_its_accuracy(tmp_path):
    from fedblend.runner import evaluate_run

    cfg = _smoke(tmp_path, "algorithm='fedclip'", "tripleplay.gan=false", "vision.personal=true")
    s = run_experiment(cfg, tmp_path / "run")
    again = evaluate_run(tmp_path / "run", ["engine.threads=1"], tmp_path / "again")
    assert again["evaluated_from"] == str(tmp_path / "run")
    assert again["accuracy"] == s["accuracy"]
    assert again["accuracy_per_round"] == s["accuracy_per_round"]
    assert again["comm"] == s["comm"]
