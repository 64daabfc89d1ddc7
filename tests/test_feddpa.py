from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fitted_raw, informative, tiny_raw

from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import ClientContext
from fedblend.algorithms.feddpa import dynamic_weights
from fedblend.comm.codec import decode
from fedblend.config import config_from_dict
from fedblend.errors import ConfigError
from fedblend.runner import evaluate_run, run_experiment
from fedblend.store.files import load_state
from fedblend.text import synthetic
from fedblend.text.backbone import format_prompt, load_text_backbone
from fedblend.text.trainer import TextTrainer


def _trainer(**feddpa):
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t", feddpa={"weighting": "dynamic", "dynamic_top_k": 2,
                                                                     "dynamic_lambda": 0.5, **feddpa}))
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    g = torch.Generator().manual_seed(4)
    for role in ("global", "local"):
        tr.adapters.set(role, {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in tr.adapters.get(role).items()})
    return cfg, tr


def _last_hidden_by_hand(tr: TextTrainer, instruction: str) -> torch.Tensor:
    """One prompt, no padding, local adapter only: the last layer's state at the last token."""
    ids = tr.tok(format_prompt(instruction), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), tr.adapters.mixing({"local": 1.0}):
        out = tr.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-1][0, -1]


@pytest.mark.parametrize("convention", ["intent", "official"])
def test_dynamic_weight_equals_the_formula_by_hand(convention: str):
    cfg, tr = _trainer(weighting_convention=convention)
    algo = make_algorithm(cfg)
    train = synthetic.generate("parity", 4, 0) + synthetic.generate("uppercase", 2, 0)
    tests = [synthetic.generate("parity", 1, 9)[0].instruction, synthetic.generate("sort_numbers", 1, 9)[0].instruction]
    ctx = ClientContext(cid=0, round=2, seed=1, examples=train, trainer=tr, cfg=cfg)
    mix, recorded = algo.eval_mix(ctx, tests)

    refs = [_last_hidden_by_hand(tr, e.instruction) for e in train]
    expected = []
    for t in tests:
        e = _last_hidden_by_hand(tr, t)
        sims = sorted((float(torch.nn.functional.cosine_similarity(e, r, dim=0)) for r in refs), reverse=True)
        expected.append(0.5 * sum(sims[:2]) / 2)
    expected_t = torch.tensor(expected)
    torch.testing.assert_close(recorded, expected_t, rtol=1e-4, atol=1e-5)
    on_local = mix["local"] if convention == "intent" else mix["global"]
    on_other = mix["global"] if convention == "intent" else mix["local"]
    torch.testing.assert_close(on_local, expected_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(on_other, 1 - expected_t, rtol=1e-4, atol=1e-5)
    # the reference prompts are embedded once per client and reused
    ref = ctx.extra["reference_emb"]
    algo.eval_mix(ctx, tests)
    assert ctx.extra["reference_emb"] is ref


def test_dynamic_weights_top_k():
    test = torch.tensor([[1.0, 0.0]])
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(dynamic_weights(test, refs, 0.5, 1), torch.tensor([0.5]))
    torch.testing.assert_close(dynamic_weights(test, refs, 0.5, 2), torch.tensor([0.25]))
    torch.testing.assert_close(dynamic_weights(test, refs, 1.0, 3), torch.tensor([0.0]))


@pytest.mark.parametrize(("mode", "expected"), [
    ("global", {"global": 1.0}), ("local", {"local": 1.0}),
])
def test_single_adapter_modes(mode, expected):
    cfg, tr = _trainer(weighting=mode)
    ctx = ClientContext(cid=0, round=1, seed=1, examples=synthetic.generate("parity", 2, 0), trainer=tr, cfg=cfg)
    assert make_algorithm(cfg).eval_mix(ctx, ["x"]) == (expected, None)


def test_static_conventions():
    for convention, local_w in (("intent", 0.3), ("official", 0.7)):
        cfg, tr = _trainer(weighting="static", static_weight=0.3, weighting_convention=convention)
        ctx = ClientContext(cid=0, round=1, seed=1, examples=[], trainer=tr, cfg=cfg)
        mix, rec = make_algorithm(cfg).eval_mix(ctx, ["x"])
        assert rec is None and mix["local"] == pytest.approx(local_w) and mix["global"] == pytest.approx(1 - local_w)


@pytest.mark.parametrize("algo", ["feddpa_t", "feddpa_f"])
def test_local_adapter_never_leaves_the_client(algo: str, tmp_path: Path):
    sent = []
    cfg = config_from_dict(tiny_raw(algorithm=algo, feddpa={"finetune_epochs": 1}))
    summary = run_experiment(cfg, tmp_path / algo, tap=lambda *a: sent.append(a))
    states = {int(p.stem): load_state(p) for p in (tmp_path / algo / "final" / "clients").glob("*.safetensors")}
    assert set(states) == {0, 1, 2}
    local_tensors = [t for st in states.values() for t in st["local"].values()]
    for direction, _, _, data in sent:
        msg = decode(data)
        assert set(msg.tensors) <= {"global"}
        if direction == "up":
            for t in msg.tensors.get("global", {}).values():
                assert not any(torch.equal(t, lt) for lt in local_tensors)
    assert summary["comm"]["shared_roles"] == ["global"]
    assert len(summary["adapters"]["local"]) == 3
    assert summary["instance_weights"]["own_task"]["n"] == 3 * 3
    weights = [json.loads(x).get("weight") for x in (tmp_path / algo / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(w is not None for w in weights)


def test_feddpa_t_local_persists_and_phases(tmp_path: Path, monkeypatch):
    from fedblend.text.trainer import TextTrainer as T

    phases: list[tuple[int, dict, dict]] = []  # (client, L before, L after) per local phase
    original = T.train

    def spy(self, key, examples, trainable, mix, epochs, seed, **kw):
        if list(trainable) != ["local"]:
            return original(self, key, examples, trainable, mix, epochs, seed, **kw)
        before = {k: v.clone() for k, v in self.adapters.get("local").items()}
        out = original(self, key, examples, trainable, mix, epochs, seed, **kw)
        phases.append((key[1], before, {k: v.clone() for k, v in self.adapters.get("local").items()}))
        return out

    monkeypatch.setattr(T, "train", spy)
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_t", train={"rounds": 3}))
    run_experiment(cfg, tmp_path / "t")
    rounds = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_local" not in m for m in rounds[0]["client_metrics"].values())  # round 0: global only
    assert all("loss_local" in m for r in rounds[1:] for m in r["client_metrics"].values())
    # a local phase in rounds 1 and 2 for each client; round 2's starts from round 1's result
    # (L persists on the client), and each phase trains it
    assert sorted(c for c, _, _ in phases) == [0, 0, 1, 1, 2, 2]
    eq = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    for cid in (0, 1, 2):
        (_, b1, a1), (_, b2, a2) = [p for p in phases if p[0] == cid]
        assert eq(b2, a1) and not eq(a1, b1) and not eq(a2, b2), cid
        final = load_state(tmp_path / "t" / "clients" / f"{cid}.safetensors")["local"]  # the client store
        assert eq(final, a2), cid  # and the last one is what the client keeps


def test_feddpa_f_starts_local_from_final_global(tmp_path: Path, monkeypatch):
    from fedblend.text.trainer import TextTrainer as T

    seen = {}
    original = T.train

    def spy(self, key, examples, trainable, mix, epochs, seed, **kw):
        if list(trainable) == ["local"]:
            seen.setdefault("start", (self.adapters.get("local"), self.adapters.get("global")))
        return original(self, key, examples, trainable, mix, epochs, seed, **kw)

    monkeypatch.setattr(T, "train", spy)
    cfg = config_from_dict(tiny_raw(algorithm="feddpa_f", feddpa={"finetune_epochs": 1}))
    run_experiment(cfg, tmp_path / "f")
    local0, _ = seen["start"]
    final_global = load_state(tmp_path / "f" / "final" / "server.safetensors")["global"]
    assert all(torch.equal(local0[k], final_global[k]) for k in final_global)


def test_feddpa_f_needs_finetune_epochs():
    with pytest.raises(ConfigError, match="feddpa.finetune_epochs"):
        make_algorithm(config_from_dict(tiny_raw(algorithm="feddpa_f")))


def test_reevaluation_changes_only_inference(tmp_path: Path, fitted_model: Path):
    cfg = config_from_dict(fitted_raw(fitted_model, algorithm="feddpa_t"))
    a = informative(run_experiment(cfg, tmp_path / "dyn"))
    b = evaluate_run(tmp_path / "dyn", ["feddpa.weighting=static", "feddpa.static_weight=0.5"], tmp_path / "static")
    assert b["comm"]["bytes_up"] == a["comm"]["bytes_up"]
    assert b["weighting"] == {"mode": "static", "convention": "intent"}
    assert b["evaluated_from"] == str(tmp_path / "dyn")
    # the trained states are re-used as they are: the local adapter alone (weighting local)
    # answers exactly as a static weight of 1 on it does, the global adapter alone as a
    # weight of 0 on the local one; and the two adapters answer differently
    preds = {}
    for name, sets in (("local", ["feddpa.weighting=local"]), ("w1", ["feddpa.weighting=static", "feddpa.static_weight=1.0"]),
                       ("global", ["feddpa.weighting=global"]), ("w0", ["feddpa.weighting=static", "feddpa.static_weight=0.0"])):
        evaluate_run(tmp_path / "dyn", sets, tmp_path / name)
        preds[name] = [json.loads(x)["prediction"] for x in (tmp_path / name / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert preds["local"] == preds["w1"] and preds["global"] == preds["w0"]
    assert preds["local"] != preds["global"]
    with pytest.raises(ConfigError, match="only inference settings"):
        evaluate_run(tmp_path / "dyn", ["train.rounds=5"], tmp_path / "bad")
    with pytest.raises(ConfigError, match="only inference settings"):  # trains: not inference
        evaluate_run(tmp_path / "dyn", ["feddpa.local_weight=0.2"], tmp_path / "bad")
