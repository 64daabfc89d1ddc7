"""fedblend bench: the FLOP / efficiency arithmetic on fixed numbers, the generation token
count, the naive reference's FedAvg through disk, and every JSON key from a tiny bench."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedblend.bench.flops import (
    LinearCounts,
    RateProbe,
    efficiency,
    eval_flops,
    linear_counts,
    train_flops,
)
from fedblend.bench.text import GenerationCounter
from fedblend.cli import app
from fedblend.config import LoraConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _naive():
    spec = importlib.util.spec_from_file_location("naive_reference", ROOT / "benchmarks" / "naive_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_and_efficiency_arithmetic():
    c = LinearCounts(body=100, head=10)
    assert train_flops(c, tokens=50, response_tokens=20) == 4 * 100 * 50 + 4 * 10 * 20
    assert eval_flops(c, prompt_tokens=30, generated_tokens=5) == 2 * 100 * 35 + 2 * 10 * 5
    assert efficiency(4e9, seconds=2.0, peak_gflops=4.0) == pytest.approx(0.5)
    assert efficiency(0.0, 1.0, 1.0) is None and efficiency(1.0, 0.0, 1.0) is None


class SleepyProbe(RateProbe):
    """A probe whose burst takes a known 0.2 s and reads a known rate."""

    def sample(self) -> float:
        t = time.perf_counter()
        time.sleep(0.2)
        self.samples.setdefault(self.phase, []).append(100.0)
        self.spent[self.phase] = self.spent.get(self.phase, 0.0) + time.perf_counter() - t
        return 100.0


def test_rate_probe_keeps_each_phase_bursts_apart():
    probe = RateProbe(size=64, repeats=1)
    probe.start("a")
    probe.sample()
    probe.sample()
    probe.start("b")
    probe.finish()
    got = probe.summary()
    assert {k: v["n"] for k, v in got.items()} == {"a": 2, "b": 1}
    assert probe.rate("a") == pytest.approx(sum(probe.samples["a"]) / 2) and probe.rate("a") > 0
    assert got["a"]["min"] <= got["a"]["mean"] <= got["a"]["max"] and got["a"]["probe_s"] > 0
    assert probe.rate("c") is None
    assert {v["dtype"] for v in got.values()} == {"float32"}


def test_rate_probe_bursts_run_in_the_phase_precision(monkeypatch):
    from fedblend.bench import flops

    seen = []
    real = flops.matmul_peak
    monkeypatch.setattr(flops, "matmul_peak", lambda size, repeats, dtype: seen.append(dtype) or real(size, 1, dtype))
    probe = RateProbe(size=32, repeats=1)
    probe.start("fp32")
    probe.sample()
    probe.start("bf16", "bfloat16")
    probe.sample()
    probe.start("next")  # the precision carries on until a phase names another
    probe.sample()
    assert seen == ["float32", "bfloat16", "bfloat16"]
    assert {k: v["dtype"] for k, v in probe.summary().items()} == {
        "fp32": "float32", "bf16": "bfloat16", "next": "bfloat16"}
    assert real(32, 1, "bfloat16")["dtype"] == "bfloat16" and real(32, 1, "bfloat16")["gflops"] > 0


def test_probe_bursts_are_left_out_of_the_round_and_the_evaluation_time(tmp_path):
    from fedblend.bench.core import bench_config
    from fedblend.bench.text import evaluate_timed, train_session

    cfg = bench_config("fedit", "tiny", None)
    probe = SleepyProbe()
    probe.start("train")
    s = train_session(cfg, tmp_path / "run", probe)
    n_clients = len(s.fed.clients)
    assert probe.summary()["train"]["n"] == n_clients * cfg.train.rounds  # one before each update
    removed = 0.0
    for raw, kept in zip(s.rounds, s.train["rounds"], strict=True):
        assert raw["seconds"] - kept["seconds"] >= 0.2 * n_clients - 1e-6
        removed += raw["seconds"] - kept["seconds"]
        # the bursts are not engine overhead: overhead is what is left of the kept time
        assert kept["overhead_s"] == pytest.approx(kept["seconds"] - kept["clients_s"])
    # the bursts' time (the engine times the call around each burst: a few microseconds more)
    assert removed == pytest.approx(probe.spent["train"], abs=1e-3)
    probe.start("eval")
    plain = evaluate_timed(s, ttp=False)
    t = time.perf_counter()
    timed = evaluate_timed(s, ttp=False, probe=probe)
    wall = time.perf_counter() - t
    bursts = probe.summary()["eval"]["n"]
    assert bursts == plain["generate_calls"] >= 1  # fedit: generation batches only
    assert timed["generated_tokens"] == plain["generated_tokens"]
    assert wall - timed["seconds"] >= 0.2 * bursts - 1e-6  # the bursts are subtracted


def test_linear_counts_of_the_tiny_llama_exclude_lora():
    from fedblend.adapters.lora import DualLoRA
    from fedblend.text.backbone import load_text_backbone

    cfg = ModelConfig(source="tiny", tiny_hidden_size=64, tiny_layers=2, tiny_heads=4)
    model, tok = load_text_backbone(cfg)
    h, inter = 64, 128  # the tiny Llama: intermediate = 2 x hidden, as many kv as query heads
    body = 2 * (4 * h * h + 3 * h * inter)
    assert linear_counts(model) == LinearCounts(body=body, head=len(tok) * h)
    wrapped = DualLoRA(model, LoraConfig(r=4, alpha=8, dropout=0.0)).model
    assert linear_counts(wrapped) == LinearCounts(body=body, head=len(tok) * h)


def test_generation_counter_stops_each_row_at_its_eos():
    class Model(torch.nn.Module):  # a real generate contract: prompt columns, then new tokens
        def generate(self, input_ids, attention_mask, **kw):
            new = torch.tensor([[5, 9, 6, 9], [7, 7, 7, 7]])  # row 0 ends at EOS (9)
            return torch.cat([input_ids, new], dim=1)

    m = Model()
    c = GenerationCounter(m, eos_id=9, pad_id=0)
    ids = torch.tensor([[0, 3, 4], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with c.counting():
        m.generate(input_ids=ids, attention_mask=mask)
    assert (c.calls, c.prompt_tokens, c.generated_tokens) == (1, 5, 2 + 4)
    assert "generate" not in m.__dict__  # the wrapper is gone


def test_naive_reference_fedavg_of_two_saved_adapters_is_their_mean(tmp_path):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from fedblend.text.backbone import load_text_backbone

    model, _ = load_text_backbone(ModelConfig(source="tiny"))
    model = get_peft_model(model, PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    states = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {k: torch.randn(v.shape, generator=g) for k, v in get_peft_model_state_dict(model).items()}
        set_peft_model_state_dict(model, sd)
        model.save_pretrained(str(tmp_path / f"c{i}"))
        states.append(sd)
    naive = _naive()
    avg = naive.fedavg_adapter_files([tmp_path / "c0", tmp_path / "c1"], [1, 1])
    weighted = naive.fedavg_adapter_files([tmp_path / "c0", tmp_path / "c1"], [1, 3])
    assert set(avg) == set(states[0])
    for k in avg:
        torch.testing.assert_close(avg[k], (states[0][k] + states[1][k]) / 2)
        torch.testing.assert_close(weighted[k], 0.25 * states[0][k] + 0.75 * states[1][k])


def test_bench_tiny_writes_every_key_without_third_party_output(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--model", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["peak_gflops"] > 0
    assert set(d["training_efficiency"]) == {"fedit", "feddpa_t"}
    assert all(0 < v < 2 for v in d["training_efficiency"].values())
    assert set(d["eval_efficiency"]) == {"P", "TTP"} and all(v > 0 for v in d["eval_efficiency"].values())
    assert "ttp_batched_speedup" in d and d["naive_ratio"] > 0
    assert set(d["backbone_bytes"]) == set(d["peak_rss_mb"]) == {"none", "int8", "nf4"}
    assert d["backbone_bytes"]["none"] > 0 and d["peak_rss_mb"]["none"] > 0
    assert set(d["seconds_per_round"]) == set(d["engine_overhead_s_per_round"]) == {"fedit", "feddpa_t"}
    assert d["vision_images_per_s"] > 0 and d["naive_final_loss"] > 0 and d["fedblend_final_loss"] > 0
    assert set(d["met"]) >= {"training_efficiency.fedit", "eval_efficiency.TTP", "naive_ratio"}
    during = d["detail"]["peak_during"]  # the peak measured again during every phase
    other = ("feddpa_t@bfloat16", "eval_P@bfloat16", "eval_TTP@bfloat16")  # FedDPA-T in bfloat16
    assert set(during) == {"fedit", "naive", "feddpa_t", "eval_P", "eval_TTP", "eval_TTP_sequential", *other}
    assert {ph: v["dtype"] for ph, v in during.items()} == {
        ph: "bfloat16" if "@" in ph else "float32" for ph in during}  # bursts in the phase's precision
    # both precisions' peaks, and each phase's efficiency against the peak of its own precision
    assert d["dtype"] == "float32" and set(d["peak_gflops_by_dtype"]) == {"float32", "bfloat16"}
    assert d["peak_gflops"] == d["peak_gflops_by_dtype"]["float32"] > 0 and d["peak_gflops_by_dtype"]["bfloat16"] > 0
    rec = {"float32": (d["detail"]["training"]["feddpa_t"], d["detail"]["evaluation"]),
           "bfloat16": (d["detail"]["other_precision"]["training"]["feddpa_t"],
                        d["detail"]["other_precision"]["evaluation"])}
    for dt, tag in (("float32", ""), ("bfloat16", "@bfloat16")):
        by, (train, ev) = d["by_dtype"][dt], rec[dt]
        assert by["training_efficiency"]["feddpa_t"] == pytest.approx(
            efficiency(train["flops"], train["seconds"], during["feddpa_t" + tag]["mean"]))
        for k in ("P", "TTP"):
            assert by["eval_efficiency"][k] == pytest.approx(
                efficiency(ev[k]["flops"], ev[k]["seconds"], during[f"eval_{k}{tag}"]["mean"]))
    assert d["by_dtype"]["float32"]["eval_efficiency"] == d["eval_efficiency"]  # the main run's
    assert set(d["bf16_speedup"]) == {"train", "eval_P", "eval_TTP"} and all(v > 0 for v in d["bf16_speedup"].values())
    bf, fp = rec["bfloat16"][0], rec["float32"][0]
    assert d["bf16_speedup"]["train"] == pytest.approx(
        (bf["flops"] / bf["seconds"]) / (fp["flops"] / fp["seconds"]))
    assert set(d["met"]) >= {"bf16_speedup.train", "bf16_speedup.eval_TTP"}
    assert "bf16_speedup" in r.output
    fedit = d["detail"]["training"]["fedit"]
    assert d["training_efficiency"]["fedit"] == pytest.approx(
        efficiency(fedit["flops"], fedit["seconds"], during["fedit"]["mean"]))
    assert d["detail"]["vs_start_peak"]["training_efficiency"]["fedit"] == pytest.approx(
        efficiency(fedit["flops"], fedit["seconds"], d["peak_gflops"]))
    assert "measured during the phase" in r.output
    ev = d["detail"]["evaluation"]["TTP"]
    assert ev["generated_tokens"] > 0 and ev["prompt_tokens"] > ev["generated_tokens"]
    # every measurement was taken: no error recorded (an error used to pass if it was in a
    # memory or speed-up measurement); without bitsandbytes only the quantized memory rows fail
    import importlib.util

    allowed = set() if importlib.util.find_spec("bitsandbytes") else {"memory_int8", "memory_nf4"}
    assert set(d["detail"]["errors"]) <= allowed, d["detail"]["errors"]
    assert d["ttp_batched_speedup"] > 0
    assert all(d["backbone_bytes"][q] > 0 for q in {"none", "int8", "nf4"} - {k[7:] for k in allowed})
    for noise in ("Warning", "{'loss'", "it/s", "Map:"):
        assert noise not in r.output


def test_bench_without_the_data_dir_fails_in_one_line(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--quick", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b.json")])
    assert r.exit_code != 0
    assert "--data" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_bench_with_an_unknown_dtype_fails_in_one_line(tmp_path):
    out = tmp_path / "sub" / "b.json"
    r = CliRunner().invoke(app, ["bench", "--model", "tiny", "--dtype", "half", "--out", str(out)])
    assert r.exit_code == 2
    assert "--dtype" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "sub").exists()


def test_a_float32_bench_skips_bfloat16_where_it_is_not_native():
    from fedblend.bench import core

    assert not core.runs_other_precision("quick", "float32", native=False)
    assert not core.runs_other_precision("full", "float32", native=False)
    assert core.runs_other_precision("quick", "float32", native=True)
    assert core.runs_other_precision("quick", "bfloat16", native=False)  # asked for: runs anyway
    assert core.runs_other_precision("tiny", "float32", native=False)
