"""eval/stats.py: every number checked against a value derived by hand from a constructed results table."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from eval import stats
from gen.shards import rows_to_table

NO_PHASE = {"PASS", "NO_CODE", "INFRA_ERROR"}


def results(spec: dict[int, dict[str, list[str]]], model: str = "m", adapter: str | None = None):
    """Rows for one variant: spec[run_seed][problem_id] = outcomes of samples 0..k-1.

    An outcome may carry a phase as "NAME_ERROR@definition"; failures default to the test phase.
    """
    rows = []
    for seed, problems in spec.items():
        for pid, outcomes in problems.items():
            for i, o in enumerate(outcomes):
                name, _, phase = o.partition("@")
                rows.append(dict(
                    run_id=f"eval-{adapter or 'base'}", unit_id=f"{seed}-{pid}", problem_id=pid, sample_index=i,
                    run_seed=seed, seed=seed * 1000 + i, model=model, adapter=adapter, prompt="p", completion="c",
                    completion_tokens=1, finish_reason="stop", cumulative_logprob=None, outcome=name,
                    phase=None if name in NO_PHASE else (phase or "test"), error_type=None, error_message=None,
                    exec_time_s=0.0,
                ))
    return rows


def counts(rows) -> list[stats.VariantCounts]:
    return stats.count_outcomes(rows_to_table(rows))


def one(rows) -> stats.VariantCounts:
    (vc,) = counts(rows)
    return vc


def test_pass_at_k_matches_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (5, 1, 2), (20, 7, 5), (8, 0, 3), (8, 6, 3), (4, 4, 4)]:
        want = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert stats.pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12), (n, c, k)
    assert stats.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert stats.pass_at_k(5, 1, 2) == pytest.approx(0.4)  # 1 - C(4,2)/C(5,2) = 1 - 6/10


def test_pass_at_k_stable_where_binomials_overflow_floats():
    n, c, k = 4000, 1000, 200  # C(4000, 200) ~ 1e370: a float ratio of binomials would be inf/inf
    want = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert stats.pass_at_k(n, c, k) == pytest.approx(float(want), rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        stats.pass_at_k(n, c, k)


def test_seed_pass_at_1_is_mean_over_problems_of_c_over_n():
    vc = one(results({0: {"a": ["PASS", "PASS", "NAME_ERROR", "PASS"], "b": ["TYPE_ERROR"] * 3 + ["PASS"],
                          "c": ["PASS"] * 4}}))
    # (3/4 + 1/4 + 1) / 3
    assert stats.seed_pass_at_1(vc).tolist() == pytest.approx([2 / 3])


def test_infra_error_excluded_from_rates_but_counted():
    vc = one(results({
        0: {"a": ["PASS", "INFRA_ERROR"], "b": ["NAME_ERROR", "NAME_ERROR"], "c": ["INFRA_ERROR", "INFRA_ERROR"]},
        1: {"a": ["PASS", "PASS"], "b": ["PASS", "NAME_ERROR"], "c": ["PASS", "INFRA_ERROR"]},
    }))
    # seed 0: a = 1/1 (infra sample dropped), b = 0/2, c has no scored sample -> left out: (1 + 0) / 2
    # seed 1: a = 1, b = 1/2, c = 1/1: 2.5 / 3
    assert stats.seed_pass_at_1(vc).tolist() == pytest.approx([0.5, 2.5 / 3])
    s = stats.summarize_variant(vc)
    assert s["infra"] == {"samples": 4, "per_seed": {"0": 3, "1": 1}, "excluded_problem_seeds": 1}
    assert s["failures"]["NAME_ERROR"]["per_seed"] == {"0": 1.0, "1": 0.5}
    assert "INFRA_ERROR" not in s["failures"]


def test_all_infra_seed_is_an_error_not_a_zero():
    vc = one(results({0: {"a": ["INFRA_ERROR"]}, 1: {"a": ["PASS"]}}))
    with pytest.raises(ValueError, match="INFRA_ERROR"):
        stats.seed_pass_at_1(vc)


def test_mean_and_sample_std_across_seeds():
    spec = {  # 10 problems, k=1: pass@1 per seed 0.5, 0.7, 0.6
        s: {f"p{i}": ["PASS" if i < m else "ASSERTION_FAIL"] for i in range(10)}
        for s, m in ((1, 5), (2, 7), (3, 6))
    }
    p1 = stats.summarize_variant(one(results(spec)))["pass_at_1"]
    assert p1["mean"] == pytest.approx(0.6)
    assert p1["std"] == pytest.approx(0.1)  # sqrt(((-.1)^2 + .1^2 + 0) / (3 - 1))
    assert p1["n_seeds"] == 3 and p1["std_defined"] is True


def test_one_seed_reports_std_zero_and_flags_it():
    p1 = stats.summarize_variant(one(results({7: {"a": ["PASS"], "b": ["NO_CODE"]}})))["pass_at_1"]
    assert (p1["mean"], p1["std"], p1["std_defined"]) == (0.5, 0.0, False)


def test_category_counts_are_divided_by_k():
    vc = one(results({0: {"a": ["NAME_ERROR", "NAME_ERROR"], "b": ["NAME_ERROR", "PASS"], "c": ["TYPE_ERROR", "PASS"]}}))
    f = stats.summarize_variant(vc)["failures"]
    assert f["NAME_ERROR"]["mean"] == pytest.approx(1.5)  # 3 samples / k=2
    assert f["TYPE_ERROR"]["mean"] == pytest.approx(0.5)


def test_category_counts_with_k1_are_plain_counts_averaged_over_seeds():
    spec = {0: {f"p{i}": ["NAME_ERROR" if i < 6 else "PASS"] for i in range(10)},
            1: {f"p{i}": ["NAME_ERROR" if i < 3 else "PASS"] for i in range(10)}}
    ne = stats.summarize_variant(one(results(spec)))["failures"]["NAME_ERROR"]
    assert (ne["mean"], ne["std"]) == pytest.approx((4.5, math.sqrt(4.5)))  # counts 6 and 3


def test_passes_plus_failures_add_up_to_problems():
    vc = one(results({0: {"a": ["NAME_ERROR", "PASS", "TIMEOUT"], "b": ["NO_CODE", "SYNTAX_ERROR@definition", "PASS"],
                          "c": ["PASS", "PASS", "INFRA_ERROR"]}}))
    s = stats.summarize_variant(vc)
    assert s["pass_at_1"]["mean"] * 3 + s["failures_total"]["mean"] == pytest.approx(3)


def test_phase_split_separates_definition_and_test_failures():
    vc = one(results({0: {"a": ["NAME_ERROR@definition"], "b": ["NAME_ERROR@test"], "c": ["SYNTAX_ERROR@definition"],
                          "d": ["NO_CODE"]}}))
    ph = stats.summarize_variant(vc)["phases"]
    assert ph["definition"]["total"]["mean"] == 2 and ph["test"]["total"]["mean"] == 1 and ph["none"]["total"]["mean"] == 1
    assert ph["definition"]["by_category"]["NAME_ERROR"]["mean"] == 1
    assert ph["definition"]["by_category"]["SYNTAX_ERROR"]["mean"] == 1


def test_sign_test_exact_values():
    assert stats.sign_test(8, 1) == 0.0390625  # 2 * (C(9,0) + C(9,1)) / 2^9
    assert stats.sign_test(1, 8) == 0.0390625
    assert stats.sign_test(5, 0) == 0.0625  # 2 / 2^5
    assert stats.sign_test(5, 5) == 1.0  # capped
    assert stats.sign_test(0, 0) == 1.0


def test_bootstrap_ci_is_deterministic_for_a_seed_and_varies_with_it():
    d = np.random.default_rng(1).normal(0.1, 0.3, size=50)
    a = stats.paired_bootstrap_ci(d, 2000, seed=3)
    assert a == stats.paired_bootstrap_ci(d, 2000, seed=3)
    assert a != stats.paired_bootstrap_ci(d, 2000, seed=4)
    assert a[0] < d.mean() < a[1]


def test_bootstrap_ci_matches_normal_approximation_for_many_problems():
    d = np.array([1.0] * 120 + [-1.0] * 60 + [0.0] * 220)  # 400 problems
    lo, hi = stats.paired_bootstrap_ci(d, 10_000, seed=0)
    se = d.std(ddof=0) / math.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.006)
    assert hi == pytest.approx(d.mean() + 1.96 * se, abs=0.006)


def test_bootstrap_ci_of_constant_differences_is_a_point():
    assert stats.paired_bootstrap_ci([0.25] * 7, 500) == pytest.approx((0.25, 0.25))


def _ten_problem_case():
    # k=1, one seed. p0: base passes, adapter fails (lost). p1..p8: base fails, adapter passes (gained). p9: both fail.
    base = {0: {f"p{i}": ["PASS" if i == 0 else ("NAME_ERROR" if i <= 5 else "TYPE_ERROR" if i <= 8 else "TIMEOUT")]
                for i in range(10)}}
    adapter = {0: {f"p{i}": ["SYNTAX_ERROR@definition" if i == 0 else "PASS" if i <= 8 else "TIMEOUT"] for i in range(10)}}
    return counts(results(base) + results(adapter, adapter="lora-1"))


def test_paired_comparison_matches_hand_computed_values():
    base, adapter = _ten_problem_case()
    c = stats.compare(base, adapter)
    assert (c["gained"], c["lost"], c["ties"]) == (8, 1, 1)
    assert c["delta"] == pytest.approx(0.7)  # (8 - 1) / 10
    assert (c["base_pass_at_1"], c["adapter_pass_at_1"]) == pytest.approx((0.1, 0.8))
    assert c["p_value"] == 0.0390625
    assert c["ci"][0] < 0.7 < c["ci"][1] and c["ci"][0] > 0
    assert c["verdict"] == "beyond noise" and "beyond noise (an improvement)" in c["sentence"]


def test_k1_single_seed_comparison_is_named_mcnemar():
    base, adapter = _ten_problem_case()
    assert "McNemar" in stats.compare(base, adapter)["secondary_test"]


def test_decomposition_counts_base_categories_of_gained_and_adapter_categories_of_lost():
    base, adapter = _ten_problem_case()
    dec = stats.compare(base, adapter)["decomposition"]
    assert dec["gained"]["by_base_category"] == {"NAME_ERROR": 5, "TYPE_ERROR": 3}
    assert dec["lost"]["by_base_category"] == {"PASS": 1}
    assert dec["lost"]["by_adapter_category"] == {"SYNTAX_ERROR": 1}
    assert dec["lost"]["problem_ids"] == ["p0"]


def test_decomposition_uses_majority_category_over_seeds_and_samples():
    base = results({0: {"a": ["NAME_ERROR", "TYPE_ERROR"]}, 1: {"a": ["TYPE_ERROR", "TYPE_ERROR"]}})
    adapter = results({0: {"a": ["PASS", "PASS"]}, 1: {"a": ["PASS", "NAME_ERROR"]}}, adapter="x")
    dec = stats.compare(*counts(base + adapter), stats.CompareOptions(bootstrap_samples=100))["decomposition"]
    assert dec["gained"]["by_base_category"] == {"TYPE_ERROR": 1}  # 3 TYPE_ERROR vs 1 NAME_ERROR


def test_small_changes_are_within_noise():
    base = results({0: {f"p{i}": ["PASS" if i in (0, 5) else "NAME_ERROR"] for i in range(6)}})
    adapter = results({0: {f"p{i}": ["PASS" if i in (1, 2, 5) else "NAME_ERROR"] for i in range(6)}}, adapter="x")
    c = stats.compare(*counts(base + adapter))
    assert (c["gained"], c["lost"], c["p_value"]) == (2, 1, 1.0)
    assert c["verdict"] == "within noise" and "within noise" in c["sentence"]


def test_ci_excluding_zero_is_not_enough_without_a_small_p():
    # 4 gained, 0 lost of 10: the bootstrap CI of the mean excludes 0 (an all-zero resample has prob 0.6^10),
    # but the sign test p = 2 / 2^4 = 0.125
    base = results({0: {f"p{i}": ["NAME_ERROR" if i < 4 else "PASS"] for i in range(10)}})
    adapter = results({0: {f"p{i}": ["PASS"] for i in range(10)}}, adapter="x")
    c = stats.compare(*counts(base + adapter))
    assert c["ci"][0] > 0 and c["p_value"] == 0.125
    assert c["verdict"] == "within noise" and "p >= 0.05" in c["sentence"]


def test_multi_seed_delta_averages_seeds_per_problem():
    base = results({1: {"a": ["PASS", "NAME_ERROR"], "b": ["NAME_ERROR"] * 2},
                    2: {"a": ["PASS", "PASS"], "b": ["PASS", "NAME_ERROR"]}})
    adapter = results({1: {"a": ["PASS", "PASS"], "b": ["PASS", "NAME_ERROR"]},
                       2: {"a": ["PASS", "PASS"], "b": ["PASS", "PASS"]}}, adapter="x")
    b, x = counts(base + adapter)
    c = stats.compare(b, x, stats.CompareOptions(bootstrap_samples=200))
    # base scores: a = (1/2 + 1)/2 = .75, b = (0 + 1/2)/2 = .25; adapter: a = 1, b = (1/2 + 1)/2 = .75
    assert c["delta"] == pytest.approx(((1 - .75) + (.75 - .25)) / 2)
    assert c["delta"] == pytest.approx(
        stats.summarize_variant(x)["pass_at_1"]["mean"] - stats.summarize_variant(b)["pass_at_1"]["mean"])
    assert (c["gained"], c["lost"]) == (2, 0) and "McNemar" not in c["secondary_test"]


def test_pairing_skips_seeds_where_one_side_has_only_infra_errors():
    base = results({1: {"a": ["NAME_ERROR"], "b": ["PASS"]}, 2: {"a": ["INFRA_ERROR"], "b": ["PASS"]}})
    adapter = results({1: {"a": ["NAME_ERROR"], "b": ["PASS"]}, 2: {"a": ["PASS"], "b": ["PASS"]}}, adapter="x")
    c = stats.compare(*counts(base + adapter), stats.CompareOptions(bootstrap_samples=100))
    assert (c["gained"], c["lost"], c["delta"]) == (0, 0, 0.0)  # seed 2 of problem a is not a fair pair


def test_different_problem_sets_are_rejected():
    base = results({0: {"a": ["PASS"], "b": ["PASS"]}})
    adapter = results({0: {"a": ["PASS"], "z": ["PASS"]}}, adapter="x")
    with pytest.raises(ValueError, match=r"different problem set.*only in base: \['b'\].*\['z'\]"):
        stats.compare(*counts(base + adapter))


def test_different_seeds_are_rejected():
    base = results({0: {"a": ["PASS"]}, 1: {"a": ["PASS"]}})
    adapter = results({0: {"a": ["PASS"]}, 2: {"a": ["PASS"]}}, adapter="x")
    with pytest.raises(ValueError, match=r"different seeds.*\[0, 1\].*\[0, 2\]"):
        stats.compare(*counts(base + adapter))


def test_seeds_covering_different_problems_within_a_variant_are_rejected():
    with pytest.raises(ValueError, match=r"seed 1 has 1 problems.*missing in seed 1: \['b'\]"):
        counts(results({0: {"a": ["PASS"], "b": ["PASS"]}, 1: {"a": ["PASS"]}}))


def test_adapter_of_another_model_is_rejected():
    rows = results({0: {"a": ["PASS"]}}, model="A") + results({0: {"a": ["PASS"]}}, model="B", adapter="x")
    with pytest.raises(ValueError, match="mixed models"):
        stats.choose_base(counts(rows))


def test_two_base_models_need_an_explicit_reference():
    rows = results({0: {"a": ["PASS"]}}, model="A") + results({0: {"a": ["PASS"]}}, model="B")
    with pytest.raises(ValueError, match=r"mixed models.*\['A', 'B'\]"):
        stats.choose_base(counts(rows))


def test_choose_base_by_adapter_name():
    rows = (results({0: {"a": ["PASS"]}}) + results({0: {"a": ["PASS"]}}, adapter="v1")
            + results({0: {"a": ["PASS"]}}, adapter="v2"))
    assert stats.choose_base(counts(rows), "v1").variant.adapter == "v1"
    with pytest.raises(ValueError, match="'v3' not found"):
        stats.choose_base(counts(rows), "v3")


def test_duplicate_samples_are_rejected():
    rows = results({0: {"a": ["PASS"]}})
    with pytest.raises(ValueError, match="more than once"):
        counts(rows + rows)


def test_empty_results_are_rejected():
    with pytest.raises(ValueError, match="no rows"):
        counts([])


def test_unknown_outcome_is_rejected():
    with pytest.raises(ValueError, match="unknown outcome values \\['WRONG'\\]"):
        counts(results({0: {"a": ["WRONG"]}}))
