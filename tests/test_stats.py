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


# ------------------------------------------------------------------ statistics that say what they know
# Constants: z_0.975 = 1.959964, z_0.8 = 0.841621, their sum 2.801585 (NormalDist, pure Python).
Z_SUM = stats.z_quantile(0.975) + stats.z_quantile(0.8)


def test_z_constants():
    assert Z_SUM == pytest.approx(2.801585, abs=1e-6)


def test_identical_seeds_show_the_se_over_problems_not_zero():
    # The demo's "0.750 ± 0.000": 24 problems, 18 pass on every one of 3 identical seeds.
    spec = {s: {f"p{i}": ["PASS" if i < 18 else "NAME_ERROR"] for i in range(24)} for s in range(3)}
    p1 = stats.summarize_variant(one(results(spec)))["pass_at_1"]
    assert (p1["mean"], p1["std"]) == (0.75, 0.0)  # std across seeds: sampling noise only
    # per-problem scores: 18 ones, 6 zeros; sd^2 = (18 * .25^2 + 6 * .75^2) / 23 = 4.5 / 23
    # SE = sqrt(4.5 / 23 / 24) = 0.090289
    assert p1["se"] == pytest.approx(math.sqrt(4.5 / 23 / 24), rel=1e-12)
    assert p1["se"] == pytest.approx(0.0903, abs=1e-4)
    # normal 95% CI: 0.75 +- 1.959964 * 0.090289 = [0.573037, 0.926963]
    assert p1["ci"] == pytest.approx([0.573037, 0.926963], abs=1e-6)
    assert "normal" in p1["ci_method"]


def test_se_is_clustered_by_problem_not_over_samples():
    # 2 problems x k=4 x 2 seeds: a passes all 8 samples, b none. Clustered: scores (1, 0), sd = sqrt(.5),
    # SE = sqrt(.5 / 2) = 0.5. Treating the 16 samples as independent would give sqrt(.25 * 16/15 / 16) = 0.129.
    spec = {s: {"a": ["PASS"] * 4, "b": ["NAME_ERROR"] * 4} for s in (0, 1)}
    assert stats.summarize_variant(one(results(spec)))["pass_at_1"]["se"] == pytest.approx(0.5)


def _four_problem_case():
    # 2 seeds x k=2 (N = 4 samples per problem per side). Per-problem scores (mean over seeds of c/n):
    #   a: base (1/2, 1/2) -> .5    adapter (2/2, 2/2) -> 1
    #   b: base (0, 0)     -> 0     adapter (1/2, 1/2) -> .5
    #   c: base (1, 1)     -> 1     adapter (1, 1)     -> 1
    #   d: base (2/2, 0)   -> .5    adapter (1/2, 0)   -> .25
    base = {0: {"a": ["PASS", "NAME_ERROR"], "b": ["NAME_ERROR"] * 2, "c": ["PASS"] * 2, "d": ["PASS"] * 2},
            1: {"a": ["NAME_ERROR", "PASS"], "b": ["NAME_ERROR"] * 2, "c": ["PASS"] * 2, "d": ["NAME_ERROR"] * 2}}
    adapter = {0: {"a": ["PASS"] * 2, "b": ["PASS", "NAME_ERROR"], "c": ["PASS"] * 2, "d": ["PASS", "NAME_ERROR"]},
               1: {"a": ["PASS"] * 2, "b": ["NAME_ERROR", "PASS"], "c": ["PASS"] * 2, "d": ["NAME_ERROR"] * 2}}
    return counts(results(base) + results(adapter, adapter="x"))


def test_variant_se_matches_hand_computation():
    b, x = _four_problem_case()
    # base scores (.5, 0, 1, .5): mean .5, deviations (0, -.5, .5, 0), sd^2 = .5/3, SE = sqrt(1/6/4) = 0.204124
    assert stats.summarize_variant(b)["pass_at_1"]["se"] == pytest.approx(math.sqrt(1 / 24), rel=1e-12)
    # adapter (1, .5, 1, .25): mean .6875, squared deviations sum .421875, sd^2 = .140625, SE = .1875
    assert stats.summarize_variant(x)["pass_at_1"]["se"] == pytest.approx(0.1875, rel=1e-12)


def test_paired_se_correlation_and_noise_split_match_hand_computation():
    c = stats.compare(*_four_problem_case(), stats.CompareOptions(bootstrap_samples=200))
    # d = (.5, .5, 0, -.25): delta = .1875; deviations (.3125, .3125, -.1875, -.4375), squares sum .421875,
    # Var(d) = .140625, paired SE = sqrt(.140625 / 4) = .1875
    assert c["delta"] == pytest.approx(0.1875)
    assert c["se"] == pytest.approx(0.1875, rel=1e-12)
    # normal CI: .1875 +- 1.959964 * .1875
    assert c["ci_normal"] == pytest.approx([0.1875 - 1.959964 * 0.1875, 0.1875 + 1.959964 * 0.1875], abs=1e-6)
    # corr: cov = (0*.3125 + -.5*-.1875 + .5*.3125 + 0) / 3 = .25/3; sd_base = sqrt(1/6), sd_adapter = .375
    # corr = (.25/3) / (sqrt(1/6) * .375) = 2 sqrt(6) / 9 = 0.544331
    assert c["correlation"] == pytest.approx(2 * math.sqrt(6) / 9, rel=1e-12)
    # prediction noise per side and problem: s^2 = 4/3 p(1-p) over N = 4 samples; score variance = s^2 / 4
    #   a: base p=.5 -> 1/3, adapter 0   -> 1/12     b: 0 + 1/3 -> 1/12     c: 0
    #   d: base 1/3 + adapter (4/3 * .25 * .75 = 1/4) -> 7/12 / 4 = 7/48
    # mean = (4 + 4 + 0 + 7) / 48 / 4 = 15/192 = .078125; data noise = .140625 - .078125 = .0625
    n = c["noise"]
    assert n["total_var"] == pytest.approx(0.140625, rel=1e-12)
    assert n["prediction_var"] == pytest.approx(15 / 192, rel=1e-12)
    assert n["data_var"] == pytest.approx(0.0625, rel=1e-12)
    assert n["prediction_se"] == pytest.approx(math.sqrt(15 / 192 / 4), rel=1e-12)  # 0.139754
    assert n["data_se"] == pytest.approx(0.125, rel=1e-12)  # sqrt(.0625 / 4)
    # MDE = 2.801585 * .1875 = 0.525297
    assert c["mde"] == pytest.approx(Z_SUM * 0.1875, rel=1e-12)
    assert c["mde"] == pytest.approx(0.525297, abs=1e-6)
    pw = c["power"]
    # problems needed: ceil(2.801585^2 * .140625 / .1875^2) = ceil(7.848879 * 4) = ceil(31.3955) = 32
    assert pw["problems_needed"] == 32
    # samples: need .0625 + per_sample / N' <= .1875^2 * 4 / 7.848879 = .017917: data noise alone exceeds it
    assert pw["samples_per_problem"] == 4 and pw["samples_per_problem_needed"] is None
    assert "data noise alone" in pw["needed_undefined"]


def test_samples_needed_when_prediction_noise_dominates():
    # 8 problems x k=2 x 1 seed. Base passes 1 of 2 everywhere; adapter 2/2 on p0..p3 and 1/2 on p4..p7.
    # d = (.5 x4, 0 x4): delta .25, Var(d) = 8 * .0625 / 7 = 1/14 (each squared deviation is .0625).
    # s^2 = 2/1 * .25 = .5 for a side at 1/2, 0 at 2/2. Score variance = s^2 / 2.
    #   p0..p3: .5/2 = .25; p4..p7: (.5 + .5)/2 = .5. prediction var = (4*.25 + 4*.5)/8 = .375
    #   data var = 1/14 - .375 = -0.303571 (negative estimate: reported as is, its SE as 0)
    # per-sample prediction = mean(s^2_b + s^2_a) = (4*.5 + 4*1)/8 = .75
    # room = .25^2 * 8 / 7.848879 - (-.303571) = .063703 + .303571 = .367274; N' = ceil(.75 / .367274) = 3
    base = results({0: {f"p{i}": ["PASS", "NAME_ERROR"] for i in range(8)}})
    adapter = results({0: {f"p{i}": ["PASS", "PASS"] if i < 4 else ["NAME_ERROR", "PASS"] for i in range(8)}},
                      adapter="x")
    c = stats.compare(*counts(base + adapter), stats.CompareOptions(bootstrap_samples=200))
    assert c["noise"]["data_var"] == pytest.approx(1 / 14 - 0.375, rel=1e-12)
    assert c["noise"]["data_se"] == 0.0
    assert c["power"]["samples_per_problem_needed"] == 3
    # problems needed: ceil(7.848879 * (1/14) / .0625) = ceil(8.97015) = 9
    assert c["power"]["problems_needed"] == 9


def test_mde_grows_as_problems_shrink():
    # d = +1 on a quarter of the problems, 0 elsewhere: Var(d) = P/(P-1) * .25 * .75
    #   P=40: SE = sqrt(40/39 * .1875 / 40) = 0.069338, MDE = 0.194255
    #   P=8:  SE = sqrt(8/7 * .1875 / 8)   = 0.163663, MDE = 0.458517
    mdes = {}
    for p in (8, 40):
        base = results({0: {f"q{i}": ["NAME_ERROR"] for i in range(p)}})
        adapter = results({0: {f"q{i}": ["PASS" if i < p // 4 else "NAME_ERROR"] for i in range(p)}}, adapter="x")
        c = stats.compare(*counts(base + adapter), stats.CompareOptions(bootstrap_samples=200))
        assert c["mde"] == pytest.approx(Z_SUM * math.sqrt(p / (p - 1) * 0.1875 / p), rel=1e-12)
        mdes[p] = c["mde"]
    assert mdes[40] == pytest.approx(0.194255, abs=1e-6) and mdes[8] == pytest.approx(0.458517, abs=1e-6)
    assert mdes[8] > mdes[40]


def test_mde_is_undefined_not_zero_when_every_difference_is_equal():
    rows = results({0: {f"p{i}": ["PASS" if i % 2 else "NAME_ERROR"] for i in range(6)}})
    same = results({0: {f"p{i}": ["PASS" if i % 2 else "NAME_ERROR"] for i in range(6)}}, adapter="x")
    c = stats.compare(*counts(rows + same), stats.CompareOptions(bootstrap_samples=200))
    assert c["mde"] is None and "paired SE = 0" in c["power"]["mde_undefined"]
    assert "minimum detectable effect is undefined" in c["sentence"]


def _brute_force_p(diffs) -> Fraction:
    """Every sign vector over all problems (zeros included: each doubles both counts), exact arithmetic."""
    import itertools

    d = [Fraction(x).limit_denominator(1000) for x in diffs]
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    return Fraction(hits, 2 ** len(d))


def test_permutation_p_matches_brute_force_enumeration():
    # 10 problems x k=4: d in quarters, magnitudes differ, two zeros
    base_pass = [0, 0, 1, 2, 4, 1, 0, 3, 2, 2]
    adapter_pass = [4, 3, 1, 3, 3, 4, 2, 3, 4, 1]
    base = results({0: {f"p{i}": ["PASS"] * c + ["NAME_ERROR"] * (4 - c) for i, c in enumerate(base_pass)}})
    adapter = results({0: {f"p{i}": ["PASS"] * c + ["NAME_ERROR"] * (4 - c) for i, c in enumerate(adapter_pass)}},
                      adapter="x")
    c = stats.compare(*counts(base + adapter), stats.CompareOptions(bootstrap_samples=200))
    diffs = [(a - b) / 4 for a, b in zip(adapter_pass, base_pass)]
    assert c["permutation"]["method"] == "exact" and c["permutation"]["nonzero"] == 8
    assert c["p_value"] == pytest.approx(float(_brute_force_p(diffs)), abs=1e-15)
    assert c["p_value"] == stats.sign_flip_test(diffs)["p_value"]


def test_permutation_p_exact_small_case_by_hand():
    # d = (.5, .5, -.25) (zeros dropped): sums of +-.5 +-.5 +-.25 are +-1.25, +-.75, +-.25 (two ways each);
    # |sum| >= .75 for 4 of 8 sign vectors: p = .5. The sign test on 2 wins, 1 loss gives 1.
    assert stats.sign_flip_test([0.5, 0.5, 0.0, -0.25])["p_value"] == 0.5
    assert stats.sign_test(2, 1) == 1.0


def test_permutation_monte_carlo_is_seeded_and_close_to_exact():
    d = np.array([1.0] * 7 + [-1.0] * 4 + [0.5] * 5 + [-0.5] * 6)  # m = 22 > exact_max; sum 2.5, exact p = 0.594
    mc = stats.sign_flip_test(d, exact_max=20, draws=20_000, seed=1, lattice_max=0)
    assert mc["method"] == "monte-carlo" and mc == stats.sign_flip_test(d, exact_max=20, draws=20_000, seed=1,
                                                                           lattice_max=0)
    exact = stats.sign_flip_test(d, exact_max=22)
    assert exact["method"] == "exact" and stats.sign_flip_test(d)["p_value"] == pytest.approx(exact["p_value"])
    assert 0.1 < exact["p_value"] < 0.9  # a p in the middle, where the draws matter
    assert abs(mc["p_value"] - exact["p_value"]) < 5 * mc["mc_error"] + 1 / 20_001
    assert mc["p_value"] != stats.sign_flip_test(d, exact_max=20, draws=20_000, seed=2, lattice_max=0)["p_value"]
    assert mc["mc_error"] == pytest.approx(math.sqrt(mc["p_value"] * (1 - mc["p_value"]) / 20_000))


def test_permutation_p_on_a_grid_is_exact_for_many_problems():
    # 60 problems whose scores moved by +-1/3 (3 seeds, k=1): 40 up, 20 down, sum 20/3. Under H0 the number of
    # + signs B is Binomial(60, 1/2) and |sum| = |2B - 60| / 3, so p = P(|2B - 60| >= 20), by hand.
    d = np.array([1 / 3] * 40 + [-1 / 3] * 20 + [0.0] * 18)
    want = sum(math.comb(60, b) for b in range(61) if abs(2 * b - 60) >= 20) / 2**60
    got = stats.sign_flip_test(d)
    assert got["method"] == "exact" and got["grid"] == "1/3" and got["nonzero"] == 60
    assert got["p_value"] == pytest.approx(want, rel=1e-9)
    # mixed magnitudes on the grid 1/6: the convolution agrees with enumerating all 2^m sign vectors
    mixed = np.array([1, -2, 3, 5, -1, 2, 6, -3, 1, 4, -5, 2, 1, 3]) / 6
    assert stats.sign_flip_test(mixed, exact_max=0)["p_value"] == pytest.approx(float(_brute_force_p(mixed)),
                                                                                 abs=1e-12)
    # off any grid up to 1/1000: Monte-Carlo
    assert stats.sign_flip_test(np.array([0.5, 1 / 1009] * 15), draws=1000)["method"] == "monte-carlo"
    # differences too small for any grid up to 1/1000 are not rounded away to 0 (which would read p = 1)
    tiny = stats.sign_flip_test(np.full(30, 5e-8), draws=10_000)
    assert tiny["method"] == "monte-carlo" and tiny["p_value"] < 0.01


def test_permutation_test_uses_magnitudes_where_the_sign_test_cannot():
    # 60 problems x k=4, one seed: 14 problems go 0/4 -> 4/4 (d = +1), 6 go 4/4 -> 3/4 (d = -.25), 40 unchanged.
    # Sign test on 14:6: p = 2 * sum_{i<=6} C(20, i) / 2^20 = 0.1153 (within noise by sign alone).
    # Permutation, |sum| >= 12.5 with 14 (+-1) and 6 (+-.25): all fourteen +1 (2^6 = 64 vectors) or one -1
    # (14 ways) with at most two -.25 flipped (1 + 6 + 15 = 22): 64 + 308 = 372 per side; p = 744 / 2^20.
    half = ["PASS", "PASS", "NAME_ERROR", "NAME_ERROR"]
    base = {0: {f"p{i}": ["NAME_ERROR"] * 4 if i < 14 else ["PASS"] * 4 if i < 20 else half for i in range(60)}}
    adapter = {0: {f"p{i}": ["PASS"] * 4 if i < 14 else ["PASS"] * 3 + ["NAME_ERROR"] if i < 20
                   else half for i in range(60)}}
    c = stats.compare(*counts(results(base) + results(adapter, adapter="x")))
    assert (c["gained"], c["lost"]) == (14, 6)
    assert c["sign_test_p_value"] == pytest.approx(2 * sum(math.comb(20, i) for i in range(7)) / 2**20)
    assert c["sign_test_p_value"] == pytest.approx(0.1153, abs=1e-4)
    assert c["ci"][0] > 0  # the bootstrap CI excludes 0
    assert c["p_value"] == 744 / 2**20
    assert c["verdict"] == "beyond noise"


def test_verdict_sentence_states_the_mde():
    c = stats.compare(*_four_problem_case(), stats.CompareOptions(bootstrap_samples=200))
    # MDE .525297 -> 52.5 points
    assert "this evaluation could not have detected a change smaller than 52.5 points" in c["sentence"]
    assert "80% power" in c["sentence"]


@pytest.mark.parametrize("field,value", [("power", 1.0), ("exact_max", 30), ("permutation_draws", 10)])
def test_compare_options_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must .* got {value}"):
        stats.CompareOptions(**{field: value})
