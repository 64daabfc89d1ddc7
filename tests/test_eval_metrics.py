"""P, TTP, ROUGE-L and exact match on a hand-made case: 2 clients x 2 tasks of unequal size
with fixed predictions, every expected value worked out by hand below (no stemming: all words
have at most 3 letters, which rouge-score's Porter stemmer leaves alone)."""

from __future__ import annotations

import json
from fractions import Fraction as F
from types import SimpleNamespace

import pytest
import torch

from fedblend.algorithms.base import ClientContext
from fedblend.comm.codec import Message
from fedblend.evidence import text_strata
from fedblend.stats import bootstrap
from fedblend.text.federation import ClientData, Federation
from fedblend.text.metrics import score, score_one
from fedblend.text.modality import write_eval_records
from fedblend.text.protocol import evaluate_text, summarize
from fedblend.text.sources import Example

# task "alpha" has 3 test instances, "beta" 1: a mean over pooled instances differs from the
# mean over tasks
REFS = {"alpha": ["the cat sat", "red big box", "one two six ten"], "beta": ["yes"]}
# what each client's model answers, per task
PREDS = {
    0: {"alpha": ["the cat", "big red box", "one two six ten"], "beta": ["no"]},
    1: {"alpha": ["cat", "red", "ten one"], "beta": ["Yes."]},
}
# ROUGE-L F = 2 P R / (P + R) with P = LCS / len(pred), R = LCS / len(ref), in words:
#   "the cat" / "the cat sat":            LCS 2, P 1,   R 2/3 -> 4/5
#   "big red box" / "red big box":        LCS 2, P 2/3, R 2/3 -> 2/3
#   "one two six ten" (exact):                                -> 1
#   "no" / "yes":                                             -> 0
#   "cat" / "the cat sat", "red" / "red big box": LCS 1, P 1, R 1/3 -> 1/2
#   "ten one" / "one two six ten":        LCS 1, P 1/2, R 1/4 -> 1/3
#   "Yes." / "yes" (case and punctuation dropped):            -> 1
ROUGE_L = {0: {"alpha": [F(4, 5), F(2, 3), F(1)], "beta": [F(0)]},
           1: {"alpha": [F(1, 2), F(1, 2), F(1, 3)], "beta": [F(1)]}}
EXACT = {0: {"alpha": [0, 0, 1], "beta": [0]}, 1: {"alpha": [0, 0, 0], "beta": [1]}}
OWN = {0: "alpha", 1: "beta"}


def _mean(xs) -> F:
    return sum(xs, F(0)) / len(xs)


def _expected(table) -> dict:
    """P = own task's mean; TTP = mean over tasks of each task's mean; then means over clients."""
    p = {c: _mean(table[c][OWN[c]]) for c in table}
    ttp = {c: _mean([_mean(v) for v in table[c].values()]) for c in table}
    return {"P": p, "TTP": ttp, "mean_P": _mean(list(p.values())), "mean_TTP": _mean(list(ttp.values()))}


def test_hand_worked_values_of_the_expectations():
    # the worked numbers themselves: P and TTP of each client and their means
    r = _expected(ROUGE_L)
    assert r["P"] == {0: F(37, 45), 1: F(1)}
    assert r["TTP"] == {0: F(37, 90), 1: F(13, 18)}  # not (4/5 + 2/3 + 1 + 0) / 4 = 37/60
    assert (r["mean_P"], r["mean_TTP"]) == (F(41, 45), F(17, 30))
    e = _expected(EXACT)
    assert e["P"] == {0: F(1, 3), 1: F(1)} and e["TTP"] == {0: F(1, 6), 1: F(1, 2)}


@pytest.mark.parametrize("cid", [0, 1])
def test_rouge_l_and_exact_match_per_instance(cid):
    for task, preds in PREDS[cid].items():
        for pred, ref, rl, em in zip(preds, REFS[task], ROUGE_L[cid][task], EXACT[cid][task], strict=True):
            s = score_one(pred, ref)
            assert s["rougeL"] == pytest.approx(float(rl), abs=1e-12), (pred, ref)
            assert s["exact_match"] == em, (pred, ref)
        mean = score(preds, REFS[task])
        assert mean["rougeL"] == pytest.approx(float(_mean(ROUGE_L[cid][task])), abs=1e-12)


class _Adapters:
    def __init__(self) -> None:
        self.cid: int | None = None

    def set(self, role: str, tensors) -> None:
        self.cid = int(tensors["who"].item())


class _Trainer:
    """Answers from PREDS for whichever client's adapters are loaded; checks each instruction
    reaches the model of the client being evaluated, in its task's order."""

    def __init__(self) -> None:
        self.adapters = _Adapters()

    def generate(self, instructions, mix, progress=None):
        task = instructions[0].split(":")[0]
        assert [f"{task}: {i}" for i in range(len(REFS[task]))] == list(instructions)
        return list(PREDS[self.adapters.cid][task])


class _Algorithm:
    def eval_adapters(self, final: Message, state) -> dict:
        return {"global": final.tensors["global"]}

    def eval_mix(self, ctx, instructions):
        return {"global": 1.0}, None


def _federation() -> Federation:
    test = {t: [Example(f"{t}: {i}", ref, t, ref) for i, ref in enumerate(refs)] for t, refs in REFS.items()}
    return Federation([ClientData(c, OWN[c], []) for c in (0, 1)], test)


def _evaluate(tmp_path):
    fed = _federation()
    finals = {c: Message({"global": {"who": torch.tensor([float(c)])}}) for c in (0, 1)}
    contexts = {c: ClientContext(c, 0, 0, [], None, None) for c in (0, 1)}
    results = evaluate_text(_Algorithm(), _Trainer(), fed, finals, {}, contexts, ttp=True, cross_client=False)
    return fed, results


def test_summary_p_ttp_and_means_equal_the_hand_worked_values(tmp_path):
    _, results = _evaluate(tmp_path)
    assert {c: ev.predictions for c, ev in results.items()} == PREDS  # routed to the right tasks
    for metric, table in (("rougeL", ROUGE_L), ("exact_match", EXACT)):
        want = _expected(table)
        s = summarize(results, metric)
        for c in (0, 1):
            got = s["clients"][str(c)]
            assert got["task"] == OWN[c]
            assert got["P"] == pytest.approx(float(want["P"][c]), abs=1e-12), (metric, c)
            assert got["TTP"] == pytest.approx(float(want["TTP"][c]), abs=1e-12), (metric, c)
            assert got["by_task"] == pytest.approx({t: float(_mean(v)) for t, v in table[c].items()}, abs=1e-12)
        assert s["mean"]["P"] == pytest.approx(float(want["mean_P"]), abs=1e-12), metric
        assert s["mean"]["TTP"] == pytest.approx(float(want["mean_TTP"]), abs=1e-12), metric
        assert s["mean_by_metric"][metric] == s["mean"]


def test_evidence_per_instance_scores_reproduce_the_summary(tmp_path):
    fed, results = _evaluate(tmp_path)
    run = SimpleNamespace(path=tmp_path)
    write_eval_records(run, {t: [e.output for e in ex] for t, ex in fed.test_by_task.items()}, results)
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (3 + 1)
    for metric, table in (("rougeL", ROUGE_L), ("exact_match", EXACT)):
        s = summarize(results, metric)
        (tmp_path / "summary.json").write_text(json.dumps({"metric": metric, **s}))
        strata = text_strata(tmp_path, metric)
        for name, key in (("P", "P"), ("TTP", "TTP")):
            assert bootstrap([strata[name]])["mean"] == pytest.approx(s["mean"][key], abs=1e-12), (metric, name)
        for c in (0, 1):
            assert bootstrap([strata[f"P[client {c}]"]])["mean"] == pytest.approx(s["clients"][str(c)]["P"], abs=1e-12)
            for task, values in table[c].items():  # every instance's own score, in order
                _, x = strata["TTP"][f"{c}/{task}"]
                assert x.tolist() == pytest.approx([float(v) for v in values], abs=1e-12)
