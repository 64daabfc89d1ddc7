"""Devices, precision and quantized (int8 / NF4) text backbones on this CPU (issue 12)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, tiny_raw

from fedblend.config import config_from_dict, load_config
from fedblend.device import cuda_count
from fedblend.errors import ConfigError, FedblendError
from fedblend.text.backbone import backbone_bytes, load_text_backbone
from fedblend.text.federation import build_federation
from fedblend.text.trainer import TextTrainer

NO_CUDA = cuda_count() == 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is fastest (and immune to a loaded machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize(("model", "key"), [
    ({"device": "gpu"}, "model.device"),
    ({"device": "cuda:99"}, "model.device"),
    ({"quantization": "int4"}, "model.quantization"),
    ({"dtype": "half"}, "model.dtype"),
    ({"device": "cpu", "dtype": "float16"}, "model.dtype"),
    ({"device": "cpu", "quantization": "nf4", "compute_dtype": "float16"}, "model.compute_dtype"),
])
def test_impossible_device_choices_fail_with_one_line_naming_the_key(model, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(model=model))
    msg = str(e.value)
    assert msg.startswith(f"config: {key}: ") and "\n" not in msg
    with pytest.raises(ConfigError) as e:  # the same through --set names the override
        config_from_dict(tiny_raw(), [f"model.{k}={v!r}".replace("'", '"') for k, v in model.items()])
    assert str(e.value).startswith("--set model.")


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only message")
def test_cuda_without_a_gpu_fails_clearly():
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="model.device: .* no CUDA device"):
            config_from_dict(tiny_raw(model={"device": device}))
    cfg = config_from_dict(tiny_raw(model={"device": "auto", "dtype": "bfloat16"}))  # auto -> cpu: fine
    assert cfg.model.dtype == "bfloat16"


def _trainer(quant: str, **model) -> TextTrainer:
    cfg = config_from_dict(tiny_raw(model={"quantization": quant, "device": "cpu", **model}))
    backbone, tok = load_text_backbone(cfg.model, cfg.seed)
    return TextTrainer(cfg, backbone, tok)


def _backbone_snapshot(tr: TextTrainer) -> dict[str, torch.Tensor]:
    named = list(tr.model.named_parameters()) + list(tr.model.named_buffers())
    return {n: t.detach().clone() for n, t in named if "lora_" not in n}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_lora_on_a_quantized_backbone_trains_on_cpu(quant):
    tr = _trainer(quant)
    layer = tr.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    fed = build_federation(tr.cfg)
    examples = fed.clients[0].train[:8]
    before, adapter0 = _backbone_snapshot(tr), tr.adapters.get("global")
    assert all(t.device.type == "cpu" for t in adapter0.values())
    # one backward pass: gradients reach the adapter, not the frozen quantized weights
    tr.adapters.set_trainable(["global"])
    ids, labels, mask = tr._collate(tr.tokenize("probe", examples))
    with tr.adapters.mixing({"global": 1.0}):
        logits = tr.model(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()
    b_grads = [p.grad for k, p in tr.adapters.params["global"].items() if ".lora_B." in k]
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads)
    assert all(p.grad is None for n, p in tr.model.named_parameters() if "lora_" not in n)
    tr.adapters.set_trainable(())
    # a few optimizer steps through the trainer: the adapter moves (float32), the backbone does not
    stats = tr.train(("c", 0), examples, ["global"], {"global": 1.0}, epochs=2, seed=1)
    assert stats["steps"] == 4 and torch.isfinite(torch.tensor(stats["loss"]))
    after = tr.adapters.get("global")
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(after[k], adapter0[k]) for k in after)
    now = _backbone_snapshot(tr)
    assert now.keys() == before.keys() and all(torch.equal(now[n], before[n]) for n in now)


def test_nf4_backbone_bytes_are_at_most_35_percent_of_float32():
    sizes = {}
    for quant in ("none", "int8", "nf4"):
        cfg = config_from_dict(tiny_raw(model={"quantization": quant, "device": "cpu"}))
        model, _ = load_text_backbone(cfg.model, cfg.seed)
        sizes[quant] = backbone_bytes(model)
        if quant == "none":  # float32: 4 bytes per parameter and buffer, tied embeddings once
            unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
            assert sizes["none"] == 4 * sum(t.numel() for t in unique.values())
    assert sizes["nf4"] <= 0.35 * sizes["none"]
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_bfloat16_autocast_on_cpu_trains_float32_adapters():
    tr = _trainer("none", dtype="bfloat16")
    assert next(p for n, p in tr.model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    fed = build_federation(tr.cfg)
    stats = tr.train(("c", 0), fed.clients[0].train[:4], ["global"], {"global": 1.0}, epochs=1, seed=1)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 for p in tr.adapters.params["global"].values())


def test_nf4_feddpa_run_writes_backbone_bytes_and_system(tmp_path):
    from fedblend.runner import run_experiment

    cfg = load_config(ROOT / "configs" / "tiny" / "feddpa_t.toml",
                      ["model.quantization=\"nf4\"", "train.rounds=1", "engine.progress=false",
                       "engine.threads=1", "data.synthetic_train_per_client=8",
                       "data.synthetic_test_per_task=2", "eval.max_new_tokens=3"])
    s = run_experiment(cfg, tmp_path / "run")
    assert s["memory"]["backbone_bytes"] > 0
    sysb = s["system"]
    device = "cpu" if NO_CUDA else "cuda:0"  # the tiny config's model.device is auto
    assert (sysb["device"], sysb["dtype"], sysb["quantization"]) == (device, "float32", "nf4")
    assert sysb["torch_threads"] >= 1
    assert sysb["versions"]["bitsandbytes"] and sysb["versions"]["torch"] == torch.__version__
    assert set(s["clients"]) == {"0", "1", "2"}


def test_deploy_gpus_pins_each_supernode_round_robin():
    from fedblend.deploy.gpus import check_gpus, gpu_env, parse_gpus

    assert parse_gpus("0, 2") == [0, 2]
    assert [gpu_env([0, 2], i) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "0"}]
    assert gpu_env([], 1) == {}
    assert gpu_env([2, 3], None) == {"CUDA_VISIBLE_DEVICES": "2"}  # the SuperLink / ServerApp
    check_gpus([0, 1], available=2)
    with pytest.raises(FedblendError, match="--gpus: GPU 2 does not exist; this machine has 2"):
        check_gpus([0, 2], available=2)
    with pytest.raises(FedblendError, match="--gpus: expected GPU indices"):
        parse_gpus("0,x")


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without GPUs")
def test_deploy_gpus_without_a_gpu_fails_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from fedblend.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["deploy", "local", str(ROOT / "configs" / "tiny" / "feddpa_t.toml"),
                                 "--gpus", "0,1", "--out", str(out)])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--gpus: torch sees no CUDA device" in lines[0]
    assert not out.exists() and not (tmp_path / ".run.deploy").exists()


def test_vision_backbone_honours_model_dtype(tmp_path):
    from fedblend.vision.backbones import build_tiny_clip, load_backbone, on_device

    cfg = config_from_dict({"algorithm": "fedclip", "model": {"device": "cpu", "dtype": "bfloat16"},
                            "vision": {"backbone": "tiny_clip", "image_size": 32, "dataset": "synthetic",
                                       "path": str(build_tiny_clip(tmp_path / "clip", 0, 32))}})
    names = ["red", "green"]
    fp32 = load_backbone(cfg.vision, names, 0)
    bf16 = on_device(load_backbone(cfg.vision, names, 0), cfg.model.device, cfg.model.dtype)
    assert bf16.fingerprint != fp32.fingerprint  # bfloat16 features are cached apart
    px = torch.rand(4, 3, 32, 32)
    a, b = fp32.encode(px), bf16.encode(px)
    assert b.dtype == torch.float32 and b.device.type == "cpu" and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
