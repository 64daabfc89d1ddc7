"""Interval maths on fixed numbers, claim verdicts, and the reproduce budgets as data."""

from __future__ import annotations

import numpy as np
import pytest

from fedblend.reproduce import BUDGETS, PAPERS, budget_configs, verdict
from fedblend.stats import bootstrap, fmt, paired

# two clients (strata) of 8 instances each, own tasks "a" and "b"
A = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.5, 0.5])
B = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])


def one_seed(x=A, y=B):
    return {"0": ("a", x), "1": ("b", y)}


def test_seeded_bootstrap_is_stable_and_known():
    s = bootstrap([one_seed()], n_boot=2000, seed=0)
    # point estimate: mean over strata of stratum means, exactly
    assert s["mean"] == pytest.approx((A.mean() + B.mean()) / 2)
    assert s["seeds"] == 1 and s["sd"] is None and s["instances"] == 16
    again = bootstrap([one_seed()], n_boot=2000, seed=0)
    assert (again["lo"], again["hi"]) == (s["lo"], s["hi"])
    # the recorded result of this seeded generator (numpy default_rng(0), 2000 replicates)
    assert (round(s["lo"], 6), round(s["hi"], 6)) == (0.36875, 0.75)
    assert s["half"] == pytest.approx((s["hi"] - s["lo"]) / 2)
    assert fmt(s) == f"{s['mean']:.3f} ± {s['half']:.3f}"
    # the interval brackets the mean, and a different generator seed moves it only slightly
    other = bootstrap([one_seed()], n_boot=2000, seed=1)
    assert s["lo"] < s["mean"] < s["hi"]
    assert abs(other["lo"] - s["lo"]) < 0.05 and abs(other["hi"] - s["hi"]) < 0.05


def test_seeds_are_resampled_and_widen_the_interval():
    shifted = one_seed(np.clip(A + 0.3, 0, 1), np.clip(B + 0.3, 0, 1))
    two = bootstrap([one_seed(), shifted], seed=0)
    same = bootstrap([one_seed(), one_seed()], seed=0)
    single = bootstrap([one_seed()], seed=0)
    assert two["seeds"] == 2 and two["sd"] > 0 and same["sd"] == 0
    assert two["per_seed"] == [pytest.approx(single["mean"]), pytest.approx(bootstrap([shifted])["mean"])]
    # seeds that disagree widen the interval beyond what the instances alone give
    assert two["hi"] - two["lo"] > 1.2 * (same["hi"] - same["lo"])
    # two seeds with the same scores: more instances, a narrower interval than one seed
    assert same["hi"] - same["lo"] < single["hi"] - single["lo"]


def test_identical_methods_differ_by_exactly_zero():
    d = paired([one_seed(), one_seed(B, A)], [one_seed(), one_seed(B, A)])
    assert d["mean"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0 and d["half"] == 0.0
    assert d["significant"] is False


def test_a_clearly_better_method_is_significant_and_pairing_matters():
    better = one_seed(np.clip(A + 0.25, 0, 1), np.clip(B + 0.25, 0, 1))
    d = paired([better], [one_seed()])
    assert d["significant"] is True and d["lo"] > 0
    # paired by instance: the difference interval is far narrower than the methods' own ones
    assert d["half"] < bootstrap([one_seed()])["half"] / 2
    assert paired([one_seed()], [better])["hi"] < 0


def test_paired_refuses_mismatched_instances():
    from fedblend.errors import FedblendError

    with pytest.raises(FedblendError):
        paired([one_seed()], [{"0": ("a", A[:4]), "1": ("b", B)}])
    with pytest.raises(FedblendError):
        paired([one_seed()], [one_seed(), one_seed()])


def test_verdicts_on_fixed_numbers():
    agree = {"lo": 0.02, "hi": 0.10, "half": 0.04}
    against = {"lo": -0.10, "hi": -0.02, "half": 0.04}
    wide = {"lo": -0.15, "hi": 0.20, "half": 0.175}
    narrow = {"lo": -0.01, "hi": 0.012, "half": 0.011}
    assert verdict(agree, 1, 0.05)[:2] == ("agrees", True)
    assert verdict(against, 1, 0.05)[:2] == ("disagrees", True)
    v, decided, note = verdict(wide, 1, 0.05)
    assert (v, decided) == ("inconclusive", False) and "budget too small to decide" in note
    v, decided, note = verdict(narrow, 1, 0.05)
    assert (v, decided) == ("inconclusive", True) and "too small" not in note
    assert verdict(against, 0, 0.05) == ("differs", True, "b ahead")
    assert verdict(wide, 0, 0.05)[0] == "inconclusive"
    # touching 0 but reaching past the resolvable effect: not "no difference"
    lopsided = {"lo": 0.0, "hi": 0.067, "half": 0.0335}
    assert verdict(lopsided, 1, 0.05)[:2] == ("inconclusive", False)


@pytest.mark.parametrize("paper", PAPERS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_every_budget_config_loads(paper, budget):
    configs = budget_configs(paper, budget)
    assert len(configs) >= 3
    assert len({c.seed for c in configs.values()}) == 1  # one seed list for every method
    if paper == "feddpa":
        assert {"local", "fedit", "feddpa_f", "feddpa_t"} <= set(configs)
        assert configs["feddpa_f"].section("feddpa").finetune_epochs > 0


def test_unknown_paper_and_budget_name_the_option():
    from fedblend.errors import ConfigError

    with pytest.raises(ConfigError, match="paper"):
        budget_configs("fedavg", "quick")
    with pytest.raises(ConfigError, match="--budget"):
        budget_configs("feddpa", "huge")


def test_judge_turns_fixed_scores_into_claim_verdicts(tmp_path):
    import json

    from fedblend.reproduce import FEDDPA_CLAIMS, judge, write_claims_report

    n = 40
    rng = np.random.default_rng(5)
    base = rng.uniform(0.2, 0.6, size=(2, n))

    def method(shift_p: float, shift_other: float):
        # 2 clients, own tasks t0/t1; TTP strata (client, task) for both tasks
        p = {"0": ("t0", base[0] + shift_p), "1": ("t1", base[1] + shift_p)}
        ttp = {"0/t0": ("t0", base[0] + shift_p), "0/t1": ("t1", base[1] + shift_other),
               "1/t0": ("t0", base[0] + shift_other), "1/t1": ("t1", base[1] + shift_p)}
        return [{"P": p, "TTP": ttp}]

    strata = {
        "local": method(0.05, -0.2), "fedit": method(0.0, 0.0), "feddpa_f": method(0.15, 0.0),
        "feddpa_t": method(-0.1, -0.1), "feddpa_f_static": method(0.15, 0.0),
    }
    rows = {r["id"]: r for r in judge(list(FEDDPA_CLAIMS), strata, resolve=0.05)}
    assert rows["dpa_f_vs_fedit_P"]["verdict"] == "agrees"
    assert rows["dpa_t_vs_fedit_P"]["verdict"] == "disagrees"
    assert rows["dpa_f_vs_local_TTP"]["verdict"] == "agrees"
    # the same scores with and without dynamic weighting: exactly 0, decided "no difference"
    assert rows["dynamic_vs_static_TTP"]["difference"]["half"] == 0.0
    assert (rows["dynamic_vs_static_TTP"]["verdict"], rows["dynamic_vs_static_TTP"]["decided"]) == (
        "inconclusive", True)
    assert rows["dpa_t_vs_dpa_f_P"]["verdict"] == "differs" and rows["dpa_t_vs_dpa_f_P"]["note"] == "b ahead"
    doc = {"paper": "feddpa", "title": "t", "budget": "quick", "about": "a", "seeds": [1], "wall_s": 1.0,
           "interval": "i", "methods": {}, "claims": list(rows.values())}
    html = write_claims_report(tmp_path, doc).read_text()
    assert "FedDPA-F beats FedIT" in html and "agrees" in html and "disagrees" in html
    json.dumps(doc)  # claims.json is plain JSON
