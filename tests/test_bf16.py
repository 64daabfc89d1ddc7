"""The bfloat16 path: ``model.dtype = "auto"`` resolves by hardware, training in bfloat16 stays
close to float32, and cross-client batched generation equals client-after-client in bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_raw

from fedblend import device
from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import ClientContext
from fedblend.comm.codec import Message
from fedblend.config import config_from_dict
from fedblend.modalities import modality_for
from fedblend.rounds import system_block
from fedblend.text.backbone import load_text_backbone
from fedblend.text.federation import build_federation
from fedblend.text.protocol import evaluate_text
from fedblend.text.trainer import TextTrainer

CPU = torch.device("cpu")


def _amx(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": present, "avx2": True})


def test_cpu_amx_check_reads_torch_capabilities_and_agrees_with_the_kernel_flags(monkeypatch):
    with open("/proc/cpuinfo") as f:
        flags = {w for line in f if line.startswith("flags") for w in line.split()}
    assert device.cpu_has_amx_bf16() == ("amx_bf16" in flags)  # this host, unmocked
    for present in (True, False):
        _amx(monkeypatch, present)
        assert device.cpu_has_amx_bf16() is present


def test_auto_picks_bfloat16_only_where_the_cpu_has_amx(monkeypatch):
    raw = tiny_raw(model={"source": "tiny", "max_length": 80, "dtype": "auto", "device": "cpu"})
    cfg = config_from_dict(raw)
    for present, want in ((True, "bfloat16"), (False, "float32")):
        _amx(monkeypatch, present)
        assert device.resolve_dtype("auto", CPU) == want
        assert device.resolve_dtype("float32", CPU) == "float32"  # named dtypes are never changed
        assert device.resolve_dtype("bfloat16", CPU) == "bfloat16"
        mod = modality_for(cfg)
        assert mod.cfg.model.dtype == want and cfg.model.dtype == "auto"  # the config keeps auto
        model, _ = load_text_backbone(cfg.model)
        assert next(model.parameters()).dtype == device.torch_dtype(want)
        sysblock = system_block(cfg.to_dict())  # what summary.json records
        assert (sysblock["dtype"], sysblock["dtype_requested"], sysblock["bf16_native"]) == (want, "auto", present)
        assert ("has AMX" if present else "no AMX") in sysblock["bf16_reason"]
    # the default stays float32 whatever the hardware
    assert config_from_dict(tiny_raw()).model.dtype == "float32"
    _amx(monkeypatch, True)
    assert system_block(config_from_dict(tiny_raw()).to_dict())["dtype"] == "float32"


def test_auto_on_cuda_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU-X")
    for ok, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, ok=ok: ok)
        assert device.resolve_dtype("auto", torch.device("cuda", 0)) == want


@pytest.fixture
def one_thread():
    """Tiny ops on 2 threads of a loaded shared host crawl (20x slower here); 1 thread is steady."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _train(dtype: str, monkeypatch) -> tuple[list[float], set, set]:
    cfg = config_from_dict(tiny_raw(
        model={"source": "tiny", "max_length": 80, "dtype": dtype, "tiny_hidden_size": 64},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "warmup_ratio": 0.0},
    ))
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    fed = build_federation(cfg)
    state_dtypes: set = set()
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        out = step(self, *a, **k)
        state_dtypes.update(t.dtype for s in self.state.values() for t in s.values() if t.dim() > 0)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    losses: list[float] = []  # each micro-batch's mean token loss, in order (same batches both runs)
    loss_sum = tr._loss_sum

    def record(ids, labels, mask):
        out = loss_sum(ids, labels, mask)
        losses.append(float(out.detach()) / int((labels[:, 1:] != -100).sum()))
        return out

    tr._loss_sum = record
    tr.train(("client", 0), fed.clients[0].train, ["global"], {"global": 1.0}, epochs=3, seed=1)
    lora = {p.dtype for n, p in tr.model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in tr.model.named_parameters() if "lora_" not in n}
    return losses, lora, base | {"adam:" + str(d) for d in state_dtypes}


def test_bfloat16_training_loss_within_two_percent_of_float32(monkeypatch, one_thread):
    """Tolerance: 2% of each micro-batch's mean token loss (the issue's bound on the loss
    curves). bfloat16 rounds each product's inputs to 8 mantissa bits (relative error up to
    2^-9, 0.2%); through a 2-layer forward and backward and 6 optimizer steps the losses here
    differ by at most 0.42%, so 2% leaves a 5x margin for other hosts' kernels while a path
    that diverged, or lost its updates, would be caught by it or by the "really train" check.
    Adapters or optimizer state stored in bfloat16 are caught by the dtype checks."""
    fp32, lora32, base32 = _train("float32", monkeypatch)
    bf16, lora16, base16 = _train("bfloat16", monkeypatch)
    assert lora32 == lora16 == {torch.float32}  # adapters stay float32 on the bfloat16 path
    assert torch.bfloat16 in base16 and torch.bfloat16 not in base32  # the frozen backbone is bf16
    assert "adam:torch.float32" in base16 and "adam:torch.bfloat16" not in base16  # optimizer state
    k = len(fp32) // 3  # micro-batches per epoch
    for run in (fp32, bf16):  # both really train: the last epoch's loss is well below the first's
        assert sum(run[-k:]) / k < sum(run[:k]) / k - 0.1, run
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) <= 0.02 * a, (fp32, bf16)
    assert fp32 != bf16  # the bfloat16 path really computed in bfloat16


def test_bfloat16_generation_same_client_after_client_and_cross_client(one_thread):
    cfg = config_from_dict(tiny_raw(
        algorithm="feddpa_t",
        model={"source": "tiny", "max_length": 80, "dtype": "bfloat16"},
        data={"num_clients": 3, "synthetic_test_per_task": 2},
        eval={"max_new_tokens": 5, "batch_size": 4}, feddpa={"weighting": "dynamic", "dynamic_top_k": 2},
    ))
    model, tok = load_text_backbone(cfg.model, seed=0)
    assert next(model.parameters()).dtype == torch.bfloat16
    tr = TextTrainer(cfg, model, tok)
    fed = build_federation(cfg)
    algo = make_algorithm(cfg)

    def rand(role: str, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in tr.adapters.get(role).items()}

    shared = rand("global", 100)
    finals = {c.cid: Message({"global": shared}) for c in fed.clients}
    states = {c.cid: {"local": rand("local", 200 + c.cid)} for c in fed.clients}
    seen_dtypes: set = set()
    hook = model.register_forward_hook(lambda m, i, o: seen_dtypes.add(o.logits.dtype))
    out = {}
    for batched in (False, True):
        ctx = {c.cid: ClientContext(cid=c.cid, round=cfg.train.rounds, seed=7 + c.cid, examples=c.train,
                                    trainer=tr, cfg=cfg) for c in fed.clients}
        out[batched] = evaluate_text(algo, tr, fed, finals, states, ctx, ttp=True, cross_client=batched)
    hook.remove()
    assert seen_dtypes == {torch.bfloat16}  # prefill and decode ran in bfloat16
    for cid, ev in out[False].items():
        assert out[True][cid].predictions == ev.predictions
        assert out[True][cid].scores == ev.scores
    task = fed.tasks[0]  # the clients' models differ, so equality is not trivial
    assert len({tuple(ev.predictions[task]) for ev in out[True].values()}) > 1
