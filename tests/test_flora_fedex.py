"""FLoRA and FedEx-LoRA end to end in-process: the base weights every client ends with equal the
example-weighted mean of what the clients trained (METHODS.md part 2, sections 3 and 6),
catch-up after missed rounds, the exported files and how docs/baselines.md loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fitted_raw, informative, tiny_raw

from fedblend.adapters.lora import truncate_rank
from fedblend.aggregation import exact
from fedblend.algorithms.fedex_lora import FedExLoRA
from fedblend.algorithms.flora import FLoRA
from fedblend.algorithms.merged_base import CUMULATIVE, INCREMENT
from fedblend.comm.codec import BASE_DELTA, Message, decode
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import evaluate_run, run_experiment
from fedblend.store.files import load_state


def _run(raw: dict, out: Path):
    sent: list[tuple[str, int, int, bytes]] = []
    cfg = config_from_dict(raw)
    summary = run_experiment(cfg, out, tap=lambda *a: sent.append(a))
    clients = {int(p.stem): load_state(p) for p in (out / "final" / "clients").glob("*.safetensors")}
    return cfg, summary, sent, clients


def _close(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys() and a
    for k, x in a.items():
        y = b[k]
        assert torch.allclose(x.double(), y.double(), atol=atol, rtol=0), (k, float((x - y).abs().max()))


def _mean_product(ups: list, scalings: list[float]) -> dict[str, torch.Tensor]:
    """sum_i p_i s_i B_i A_i per layer over one round's uploads, written out."""
    total = sum(m.num_examples for m in ups)
    out: dict[str, torch.Tensor] = {}
    for m, s in zip(ups, scalings, strict=True):
        for prefix, (a, b) in exact.layers(m.tensors["global"]).items():
            term = (m.num_examples / total) * s * b.double() @ a.double()
            out[prefix] = out[prefix] + term if prefix in out else term
    return out


def test_fedex_lora_merges_the_residual_exactly(tmp_path: Path, fitted_model: Path) -> None:
    cfg, summary, sent, clients = _run(fitted_raw(fitted_model, algorithm="fedex_lora"), tmp_path / "fedex")
    informative(summary)
    s = cfg.lora.alpha / cfg.lora.r
    msgs = [(d, r, c, decode(data)) for d, r, c, data in sent]
    # round 1: every client is one merge behind, so it gets round 0's residual, factored here
    # ((k+1) r (d_in + d_out) = 4*4*128 < 64*64 numbers), and the global LoRA
    down1 = [m for d, r, _, m in msgs if d == "down" and r == 1]
    assert len(down1) == 3 and all(set(m.tensors) == {"global", INCREMENT} for m in down1)
    assert all(".lora_A." in k or ".lora_B." in k for k in down1[0].tensors[INCREMENT])
    before = exact.dense(down1[0].tensors[INCREMENT])  # W_1 - W0
    g1 = down1[0].tensors["global"]
    # the model every client ends with: W_2 + s B_bar A_bar = W_1 + sum_i p_i s B_i A_i
    ups = [m for d, r, _, m in sorted(((d, r, c, m) for d, r, c, m in msgs if d == "up" and r == 1),
                                      key=lambda x: x[2])]
    assert all(set(m.tensors["global"]) == set(g1) for m in ups)
    want = {p: before[p].double() + t for p, t in _mean_product(ups, [s] * len(ups)).items()}
    final = load_state(tmp_path / "fedex" / "final" / "server.safetensors")
    assert set(clients) == {0, 1, 2}
    for st in clients.values():  # every client synced, to the same weights
        got = {p: st[BASE_DELTA][p].double() + s * b.double() @ a.double()
               for p, (a, b) in exact.layers(final["global"]).items()}
        _close(got, want)
    # the global LoRA is the example-weighted mean of the uploads
    n = [m.num_examples for m in ups]
    for k, t in final["global"].items():
        assert torch.allclose(t, sum(ni * m.tensors["global"][k] for ni, m in zip(n, ups, strict=True)) / sum(n),
                              atol=1e-7)
    assert summary["adapters"]["global"] == "adapters/global"
    assert summary["adapters"][BASE_DELTA] == f"adapters/{BASE_DELTA}"
    # `fedblend evaluate` re-scores the clients' saved final states (the delta loaded again)
    again = evaluate_run(tmp_path / "fedex", [], tmp_path / "again")
    assert again["clients"] == summary["clients"]


def test_flora_heterogeneous_ranks_partial_participation_and_catch_up(tmp_path: Path, fitted_model: Path) -> None:
    # seed 6 samples clients [0, 1], [0, 1], [1, 2]: in round 2 client 1 is one merge behind
    # (the increment) and client 2 has never trained (the cumulative delta: catch-up)
    raw = fitted_raw(fitted_model, algorithm="flora", seed=6,
                     lora={"client_ranks": [4, 2, 1], "hetero_scaling": "alpha"},
                     train={"rounds": 3, "clients_per_round": 2})
    cfg, summary, sent, clients = _run(raw, tmp_path / "flora")
    informative(summary)
    ranks = {0: 4, 1: 2, 2: 1}
    msgs = {(d, r, c): (len(data), decode(data)) for d, r, c, data in sent}
    assert sorted(c for d, r, c in msgs if d == "up" and r == 2) == [1, 2]
    for (d, _, c), (_, m) in msgs.items():
        if d == "up":  # each client sends its own rank: bytes_up count r_i
            assert exact.layers(m.tensors["global"])
            assert all(a.shape[0] == ranks[c] for a, _ in exact.layers(m.tensors["global"]).values())
    assert set(msgs["down", 0, 0][1].tensors) == set()  # round 0: nothing to merge yet
    synced_bytes, synced = msgs["down", 2, 1]
    behind_bytes, behind = msgs["down", 2, 2]
    assert set(synced.tensors) == {INCREMENT} and set(behind.tensors) == {CUMULATIVE}
    assert synced_bytes < behind_bytes  # the stacked increment is smaller than the dense delta
    # round 1's increment is round 0's stack: rank 4 + 2, as received
    inc1 = msgs["down", 1, 0][1].tensors[INCREMENT]
    assert {t.shape for k, t in inc1.items() if ".lora_A." in k} == {(6, 64)}
    # every client ends with W0 + sum over rounds of sum_k p_k s_k B_k A_k (mixed scalings 8/r_k)
    want: dict[str, torch.Tensor] = {}
    for rnd in range(3):
        cids = sorted(c for d, r, c in msgs if d == "up" and r == rnd)
        ups = [msgs["up", rnd, c][1] for c in cids]
        for p, t in _mean_product(ups, [cfg.lora.alpha / ranks[c] for c in cids]).items():
            want[p] = want[p] + t if p in want else t
    assert set(clients) == {0, 1, 2}
    for st in clients.values():
        _close(dict(st[BASE_DELTA]), want)
    # the catch-up client's weights equal the server's cumulative delta after round 1
    _close(dict(behind.tensors[CUMULATIVE]), exact.add(exact.dense(inc1), synced.tensors[INCREMENT]))
    # final payload: client 0 is two merges behind, so every client gets the cumulative delta
    assert all(set(msgs["down", 3, c][1].tensors) == {CUMULATIVE} for c in range(3))
    assert summary["adapters"] == {"local": {}, BASE_DELTA: f"adapters/{BASE_DELTA}"}
    assert not (tmp_path / "flora" / "adapters" / "global").exists()  # no LoRA survives a round
    rounds = [json.loads(x) for x in (tmp_path / "flora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [[0, 1], [0, 1], [1, 2]]


def _load_like_the_docs(model_dir: Path, run: Path):
    """docs/baselines.md's recipe, line for line."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    delta = load_file(run / "adapters" / "base_delta" / "base_delta.safetensors")
    with torch.no_grad():
        for name, d in delta.items():
            w = model.get_parameter(name)
            w.copy_((w.float() + d).to(w.dtype))
    if (run / "adapters" / "global").is_dir():  # FedEx-LoRA: its global LoRA on top
        model = PeftModel.from_pretrained(model, run / "adapters" / "global")
    return model.eval()


@pytest.mark.parametrize("algo", ["fedex_lora", "flora"])
def test_exported_delta_and_adapter_reproduce_the_runs_answers(tmp_path: Path, fitted_model: Path, algo: str) -> None:
    from transformers import AutoTokenizer

    from fedblend.text.backbone import format_prompt

    out = tmp_path / algo
    summary = run_experiment(config_from_dict(fitted_raw(fitted_model, algorithm=algo, train={"rounds": 1})), out)
    delta = (out / "adapters" / "base_delta" / "base_delta.safetensors")
    from safetensors.torch import load_file

    names = set(load_file(delta))
    assert names == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    model = _load_like_the_docs(fitted_model, out)
    tok = AutoTokenizer.from_pretrained(fitted_model)
    preds = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    mine = [p for p in preds if p["client"] == 0]
    from fedblend.text.federation import build_federation

    cfg = config_from_dict(fitted_raw(fitted_model, algorithm=algo, train={"rounds": 1}))
    fed = build_federation(cfg)
    same = 0
    for p in mine:
        instruction = fed.test_by_task[p["task"]][p["index"]].instruction
        ids = torch.tensor([tok(format_prompt(instruction), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("### Instruction")[0].strip()
        same += text == p["prediction"]
    assert same == len(mine) > 0 and any(p["prediction"] for p in mine)
    assert summary["adapters"][BASE_DELTA] == "adapters/base_delta"
    # and the logits: fedblend's evaluated client 0 (its eval adapters loaded into the trainer)
    # against the loaded files; without the delta they differ (so this can fail)
    from fedblend.algorithms import make_algorithm
    from fedblend.algorithms.base import load_into
    from fedblend.comm.codec import Message
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.trainer import TextTrainer

    algorithm = make_algorithm(cfg)
    backbone, _ = load_text_backbone(cfg.model, cfg.seed)
    trainer = TextTrainer(cfg, backbone, tok)
    final = Message(tensors=load_state(out / "final" / "server.safetensors"))
    adapters = algorithm.eval_adapters(final, load_state(out / "final" / "clients" / "0.safetensors"))
    load_into(trainer, adapters)
    ids = torch.tensor([tok(format_prompt(fed.test_by_task[mine[0]["task"]][0].instruction),
                            add_special_tokens=False)["input_ids"]])
    mix = dict.fromkeys(algorithm.eval_adapters_roles(), 1.0)
    with torch.no_grad(), trainer.adapters.mixing(mix):
        ours = trainer.model(input_ids=ids).logits
        theirs = model(input_ids=ids).logits
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())
        trainer.adapters.set_base_delta({})
        assert not torch.allclose(trainer.model(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)


def test_refused_settings_are_one_line_naming_the_key() -> None:
    for algo in ("flora", "fedex_lora"):
        config_from_dict(tiny_raw(algorithm=algo))
        for sections, key in (({"model": {"source": "tiny", "quantization": "int8"}}, "model.quantization"),
                              ({"eval": {"every": 1}}, "eval.every"),
                              ({"train": {"server_momentum": 0.9}}, "train.server_momentum"),
                              ({"aggregate": {"rule": "median"}}, "aggregate.rule"),
                              ({"lora": {"dora": True}}, "lora.dora")):
            with pytest.raises(ConfigError, match=rf"{key}: .*{algo}") as e:
                config_from_dict(tiny_raw(algorithm=algo, **sections))
            assert "\n" not in str(e.value)
    config_from_dict(tiny_raw(algorithm="flora", lora={"client_ranks": [4, 2, 2]}))
    with pytest.raises(ConfigError, match=r"lora.client_ranks: fedex_lora needs every client at one rank"):
        config_from_dict(tiny_raw(algorithm="fedex_lora", lora={"client_ranks": [4, 2, 2]}))
    with pytest.raises(ConfigError, match=r"comm.compress: flora"):
        config_from_dict(tiny_raw(algorithm="flora", comm={"compress": "int8"}))


@pytest.mark.parametrize("form", ["auto", "factored", "dense"])
def test_the_residual_travels_in_the_form_the_settings_ask(form: str) -> None:
    # 3 rank-2 clients on a 6 x 5 layer: factored (3 + 1) * 2 * (6 + 5) = 88 > 30 dense numbers
    cfg = config_from_dict(tiny_raw(algorithm="fedex_lora", fedex_lora={"residual": form}))
    algo = FedExLoRA(cfg)
    g = torch.Generator().manual_seed(0)
    p = "base_model.model.layers.0.q_proj"
    ups = {c: Message({"global": {exact.a_key(p): torch.randn(2, 6, generator=g),
                                  exact.b_key(p): torch.randn(5, 2, generator=g)}}, num_examples=c + 1)
           for c in range(3)}
    state = algo.merged({}, [], {}, 1.0) | {"global": ups[0].tensors["global"]}  # version 1
    new = algo.aggregate(1, ups, state)
    inc = new[INCREMENT]
    assert set(inc) == ({p} if form in ("auto", "dense") else {exact.a_key(p), exact.b_key(p)})
    s = cfg.lora.alpha / cfg.lora.r
    want = sum((c + 1) / 6 * s * u.tensors["global"][exact.b_key(p)] @ u.tensors["global"][exact.a_key(p)]
               for c, u in ups.items())
    g_new = new["global"]
    assert torch.allclose(exact.dense(inc)[p] + s * g_new[exact.b_key(p)] @ g_new[exact.a_key(p)], want, atol=1e-5)
    assert algo.version(new) == 2 and all(algo.client_version(new, c) == 1 for c in range(3))


def test_flora_screens_each_upload_at_its_clients_rank() -> None:
    from fedblend.text.backbone import load_text_backbone
    from fedblend.text.trainer import TextTrainer
    from fedblend.trust import screen_updates

    cfg = config_from_dict(tiny_raw(algorithm="flora", lora={"client_ranks": [4, 2, 1]}))
    algo = FLoRA(cfg)
    model, tok = load_text_backbone(cfg.model, cfg.seed)
    state = algo.init_server_state(TextTrainer(cfg, model, tok))
    up = {k: torch.ones_like(t) for k, t in state["template"].items()}  # rank 4
    ups = {c: Message({"global": truncate_rank(up, r)}, num_examples=3) for c, r in ((0, 4), (1, 2), (2, 2))}
    ok, rejected = screen_updates(algo, cfg, ups, state)
    assert sorted(ok) == [0, 1] and set(rejected) == {2} and "shape" in rejected[2]  # client 2 is rank 1
    nan = Message({"global": {k: t * float("nan") for k, t in truncate_rank(up, 2).items()}}, num_examples=3)
    assert "NaN" in screen_updates(algo, cfg, {1: nan}, state)[1][1]
    assert "template" not in algo.configure_round(0, state, [0])[0].tensors  # never sent
