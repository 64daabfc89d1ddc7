"""Cross-client batched evaluation equals client-after-client evaluation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_raw

from fedblend.adapters.batched import CrossClientLoRA
from fedblend.algorithms import make_algorithm
from fedblend.algorithms.base import ClientContext, load_into
from fedblend.comm.codec import Message
from fedblend.config import config_from_dict
from fedblend.text.backbone import load_text_backbone
from fedblend.text.federation import build_federation
from fedblend.text.protocol import evaluate_text
from fedblend.text.trainer import TextTrainer


def _random(tr: TextTrainer, role: str, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in tr.adapters.get(role).items()}


def _setup(algorithm: str, clients: int = 4, **eval_cfg):
    cfg = config_from_dict(tiny_raw(
        algorithm=algorithm,
        data={"num_clients": clients, "synthetic_test_per_task": 3},
        eval={"max_new_tokens": 6, "batch_size": 5, **eval_cfg},
        feddpa={"weighting": "dynamic", "dynamic_top_k": 2},
    ))
    model, tok = load_text_backbone(cfg.model, seed=0)
    tr = TextTrainer(cfg, model, tok)
    fed = build_federation(cfg)
    algo = make_algorithm(cfg)
    shared_global = _random(tr, "global", 100)
    finals = {c.cid: Message({"global": shared_global}) for c in fed.clients}
    states = {c.cid: {"local": _random(tr, "local", 200 + c.cid)} for c in fed.clients}
    return cfg, tr, fed, algo, finals, states


def _contexts(cfg, tr, fed):
    return {c.cid: ClientContext(cid=c.cid, round=cfg.train.rounds, seed=7 + c.cid, examples=c.train,
                                 trainer=tr, cfg=cfg) for c in fed.clients}


def _both(algorithm: str, **eval_cfg):
    cfg, tr, fed, algo, finals, states = _setup(algorithm, **eval_cfg)
    out, calls = {}, {}
    plain_embed = tr.embed

    def spy(instructions, mix, batch_context=None):
        calls[batched].append(batch_context is not None)
        return plain_embed(instructions, mix, batch_context)

    tr.embed = spy
    for batched in (False, True):
        calls[batched] = []
        out[batched] = evaluate_text(algo, tr, fed, finals, states, _contexts(cfg, tr, fed), ttp=True,
                                     cross_client=batched)
    if algorithm == "feddpa_t":
        # client after client: references, then each task's inputs, per client; batched: one pass,
        # which every client's eval_mix then reuses
        assert calls[False] == [False] * len(fed.clients) * (1 + len(fed.tasks))
        assert calls[True][0] is True and calls[True].count(True) == 1
    return fed, out[False], out[True]


@pytest.mark.parametrize("algorithm", ["feddpa_t", "local"])
def test_batched_equals_client_after_client(algorithm: str):
    fed, plain, batched = _both(algorithm)
    assert len(fed.clients) >= 3
    for cid, ev in plain.items():
        other = batched[cid]
        assert other.predictions == ev.predictions
        assert other.scores == ev.scores
        assert other.generated == ev.generated == sum(len(v) for v in fed.test_by_task.values())
        assert list(other.weights) == list(ev.weights)
        for task, ws in ev.weights.items():
            torch.testing.assert_close(torch.tensor(other.weights[task]), torch.tensor(ws),
                                       rtol=0, atol=1e-6)
    if algorithm == "feddpa_t":  # instance-wise weights were recorded for every task
        assert all(len(ev.weights) == len(fed.tasks) for ev in batched.values())
    # the clients' models really differ: the same task gets different answers across clients
    task = fed.tasks[0]
    assert len({tuple(ev.predictions[task]) for ev in batched.values()}) > 1


def test_dedupe_still_shares_identical_models():
    """FedIT: every client holds the same final G, so it is generated for once and shared."""
    fed, plain, batched = _both("fedit")
    n_test = sum(len(v) for v in fed.test_by_task.values())
    for res in (plain, batched):
        assert [ev.generated for ev in res.values()] == [n_test] + [0] * (len(fed.clients) - 1)
    assert {cid: ev.predictions for cid, ev in batched.items()} == \
        {cid: ev.predictions for cid, ev in plain.items()}


def test_row_select_layer_equals_per_client_peft_forward():
    _, tr, _, _, finals, states = _setup("feddpa_t")
    models = [{"global": finals[c].tensors["global"], **states[c]} for c in sorted(states)]
    torch.manual_seed(0)
    x = torch.randint(3, 200, (len(models), 9))
    weights = torch.tensor([0.2, 0.9, 0.5, 0.35])[: len(models)]
    mix = {"local": weights, "global": 1 - weights}
    expected = []
    with torch.no_grad():
        for c, m in enumerate(models):
            load_into(tr, m)
            with tr.adapters.mixing({r: w[c : c + 1] for r, w in mix.items()}):
                expected.append(tr.model(input_ids=x[c : c + 1]).logits)
        xc = CrossClientLoRA(tr.adapters, models)
        assert xc.varying == ["local"]  # the global adapter is shared: its plain modules stay
        with xc.active(), xc.rows(torch.arange(len(models))), tr.adapters.mixing(mix):
            got = tr.model(input_ids=x).logits
        torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)
        # rows in another order, and one client's global adapter different too
        models[1] = {**models[1], "global": _random(tr, "global", 300)}
        load_into(tr, models[1])
        with tr.adapters.mixing({r: w[1:2] for r, w in mix.items()}):
            expected[1] = tr.model(input_ids=x[1:2]).logits
        xc = CrossClientLoRA(tr.adapters, models)
        assert xc.varying == ["global", "local"]
        perm = torch.tensor([2, 0, 3, 1])
        with xc.active(), xc.rows(perm), tr.adapters.mixing({r: w[perm] for r, w in mix.items()}):
            got = tr.model(input_ids=x[perm]).logits
        torch.testing.assert_close(got, torch.cat(expected)[perm], rtol=1e-5, atol=1e-5)
    # outside the context the plain PEFT modules are back
    assert all(type(layer.lora_A["local"]) is torch.nn.Linear for layer in tr.adapters.layers)


def test_not_batchable_falls_back():
    """Eval adapters that are not the trainer's LoRA roles (or differ in roles between clients)
    are evaluated client after client."""
    from fedblend.text.batched_eval import batchable

    _, tr, _, _, finals, states = _setup("local", clients=3)
    g = finals[0].tensors["global"]
    assert batchable(tr, {0: states[0], 1: states[1]})
    assert not batchable(tr, {0: states[0], 1: {"global": g}})  # different roles
    assert not batchable(tr, {0: {"head": g}, 1: {"head": g}})  # not a LoRA role
    assert not batchable(tr, {0: {"local": dict(list(states[0]["local"].items())[:1])}})
