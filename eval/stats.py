"""Statistics over evaluation results: pass@k, per-seed rates, failure categories, paired adapter-vs-base tests.

Plain functions over a results table (gen.shards.ROW_SCHEMA: one row per sample; `adapter` null for the base
model, `run_seed` = the evaluation repetition, `sample_index` 0..k-1 per problem per seed). No engine, no cluster.

Definitions (the report prints these numbers):
- Scored sample: any sample whose outcome is not INFRA_ERROR. INFRA_ERROR is a fault of our harness, so it is
  left out of both n and c and counted separately. A (problem, seed) with no scored sample is left out of that
  seed's pass@1 and counted.
- pass@1 of a seed: mean over problems of c/n (the unbiased pass@1 from n samples).
- Failure counts of a seed, per category: sum over problems of (samples in that category) / n. With k=1 this is
  the plain count of failing problems; with k>1 it is the count divided by k, so numbers stay on the same
  per-problem scale: pass@1 * problems + all categories = problems scored.
- Across seeds: mean and sample std (ddof=1); with one seed std is reported as 0 and flagged `std_defined=False`.
  This std is sampling noise inside each problem only; it says nothing about which problems were drawn.
- Per-problem score of a variant: mean over its seeds (those with a scored sample) of c/n, so with k>1 or
  seeds>1 every sample of a problem lands in one unit (clustered by problem).
- Standard error of pass@1 over problems: SE = sd(per-problem scores, ddof=1) / sqrt(P). With equal samples per
  problem this is the clustered SE of Miller, "Adding Error Bars to Evals" (2024) and Inspect AI's clustered
  `stderr`. CI: normal (CLT) interval, mean +- z_{(1+level)/2} * SE, not clipped to [0, 1].
- Paired comparison (adapter vs base): per problem, score = mean over seeds of c/n (only seeds where both sides
  have a scored sample); d = adapter - base per problem; delta = mean(d), which equals the difference of the two
  pass@1 means when nothing is excluded. Paired SE = sd(d, ddof=1) / sqrt(P); CIs: normal (delta +- z * SE) and a
  percentile bootstrap over problems (resampled with replacement).
- Noise split (eval-arena): Var(d) = data noise + prediction noise. Prediction noise of problem j is the variance
  of its score from finite sampling, estimated unbiasedly from its samples: per side s^2 = N/(N-1) p(1-p) over its
  N pooled samples, times (1/S^2) sum_s 1/n_s (= 1/N with equal n); needs N >= 2. Data noise = Var(d) - the mean
  prediction noise (an estimate: it can come out negative, and is then reported as is and its SE as 0).
- Minimum detectable effect at power 1-beta, two-sided alpha: MDE = (z_{1-alpha/2} + z_{1-beta}) * paired SE
  (~2.8 x SE at 80% and 0.05). Problems needed for the observed delta: ceil(z^2 Var(d) / delta^2). Samples per
  problem needed at this problem count: N' with z^2 (data + prediction_per_sample / N') / P <= delta^2, where
  prediction_per_sample = mean over problems of s^2_base + s^2_adapter (None when data noise alone is too large).
- Primary test: paired sign-flip permutation test of |sum d| over the m problems with d != 0 (it uses how much
  each problem moved): exact when m <= exact_max (2^m sign vectors); exact for larger m too when the d lie on a grid
  1/L (the usual case: scores are c/n) and the convolution that builds the distribution of the integer sum fits
  lattice_max cell updates (~1,000 problems at k x seeds = 25); else
  Monte-Carlo with a seeded generator, p = (1 + hits) / (1 + draws), reported with its MC standard error.
  Secondary: exact two-sided sign test over problems whose scores differ; with binary scores (k=1, one seed) this
  is exactly McNemar's exact test.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sandbox import Outcome
from gen.shards import check_schema

OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)
FAILURES: tuple[Outcome, ...] = tuple(o for o in Outcome if o.is_model_failure)
PHASES: tuple[str | None, ...] = ("definition", "test", None)  # None: no phase (NO_CODE, PASS, INFRA_ERROR)
PHASE_NAMES: tuple[str, ...] = ("definition", "test", "none")
_OUTCOME_INDEX = {o.value: i for i, o in enumerate(OUTCOMES)}
_PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
_PASS = _OUTCOME_INDEX[Outcome.PASS.value]
_INFRA = _OUTCOME_INDEX[Outcome.INFRA_ERROR.value]
_FAIL_IDX = np.array([_OUTCOME_INDEX[o.value] for o in FAILURES])
_TIE_TOL = 1e-9  # per-problem scores are ratios of small integers; closer than this is a tie


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise ValueError(f"pass_at_k: n, c, k must be integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class Variant:
    """One evaluated model: a base model (adapter None) or a LoRA adapter on it."""

    model: str
    adapter: str | None

    @property
    def label(self) -> str:
        return self.model if self.adapter is None else self.adapter

    @property
    def is_base(self) -> bool:
        return self.adapter is None


@dataclass(frozen=True, eq=False)
class VariantCounts:
    """Sample counts of one variant: counts[seed, problem, outcome, phase] (axes: seeds, problems, OUTCOMES, PHASES)."""

    variant: Variant
    seeds: tuple[int, ...]
    problems: tuple[str, ...]
    counts: np.ndarray

    @property
    def scored(self) -> np.ndarray:  # [seed, problem] samples that are not INFRA_ERROR
        return self.counts.sum(axis=(2, 3)) - self.infra

    @property
    def passes(self) -> np.ndarray:  # [seed, problem]
        return self.counts[:, :, _PASS, :].sum(axis=-1)

    @property
    def infra(self) -> np.ndarray:  # [seed, problem]
        return self.counts[:, :, _INFRA, :].sum(axis=-1)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float  # sample std (ddof=1); 0 with one value, flagged by std_defined
    n: int

    @property
    def std_defined(self) -> bool:
        return self.n > 1

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n_seeds": self.n, "std_defined": self.std_defined}


def mean_std(values: Sequence[float]) -> MeanStd:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("mean_std: no values (no seeds)")
    return MeanStd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


def _some(items: Sequence[Any] | set, limit: int = 5) -> str:
    items = sorted(items, key=str)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def count_outcomes(table: pa.Table) -> list[VariantCounts]:
    """Validate a results table and count its samples per variant, seed, problem, outcome and phase.

    Fails with a ValueError on: no rows, an unknown outcome or phase, a row emitted twice (same variant, seed,
    problem, sample_index), or a variant whose seeds cover different problem sets (incomplete results).
    """
    check_schema(table.schema, "results")
    if table.num_rows == 0:
        raise ValueError("results: no rows (no seeds were evaluated)")
    bad = set(pc.unique(table["outcome"]).to_pylist()) - set(_OUTCOME_INDEX)
    if bad:
        raise ValueError(f"results: unknown outcome values {_some(bad)}; known: {list(_OUTCOME_INDEX)}")
    bad = set(pc.unique(table["phase"]).to_pylist()) - set(PHASES)
    if bad:
        raise ValueError(f"results: unknown phase values {_some(bad)}; known: {list(PHASES)}")
    key = ["model", "adapter", "run_seed", "problem_id", "sample_index"]
    dup = table.group_by(key).aggregate([("run_id", "count")]).filter(pc.field("run_id_count") > 1)
    if dup.num_rows:
        r = dup.slice(0, 1).to_pylist()[0]
        raise ValueError(
            f"results: {dup.num_rows} samples appear more than once, e.g. model={r['model']!r} adapter={r['adapter']!r} "
            f"run_seed={r['run_seed']} problem_id={r['problem_id']!r} sample_index={r['sample_index']} "
            f"({r['run_id_count']} rows); was the same results folder passed twice?"
        )
    grouped = table.group_by(["model", "adapter", "run_seed", "problem_id", "outcome", "phase"]).aggregate(
        [("sample_index", "count")]
    )
    g = {name: grouped[name].to_pylist() for name in grouped.column_names}
    by_variant: dict[Variant, list[int]] = {}
    for i, (m, a) in enumerate(zip(g["model"], g["adapter"])):
        by_variant.setdefault(Variant(m, a), []).append(i)

    out = []
    for variant in sorted(by_variant, key=lambda v: (v.model, v.adapter is not None, v.adapter or "")):
        rows = by_variant[variant]
        per_seed: dict[int, set[str]] = {}
        for i in rows:
            per_seed.setdefault(g["run_seed"][i], set()).add(g["problem_id"][i])
        seeds = tuple(sorted(per_seed))
        problems = tuple(sorted(set().union(*per_seed.values())))
        for s in seeds:
            if len(per_seed[s]) != len(problems):
                raise ValueError(
                    f"results: {variant.label!r} seed {s} has {len(per_seed[s])} problems but its other seeds have "
                    f"{len(problems)}; missing in seed {s}: {_some(set(problems) - per_seed[s])} (incomplete run?)"
                )
        s_idx = {s: i for i, s in enumerate(seeds)}
        p_idx = {p: i for i, p in enumerate(problems)}
        counts = np.zeros((len(seeds), len(problems), len(OUTCOMES), len(PHASES)), dtype=np.int64)
        for i in rows:
            counts[
                s_idx[g["run_seed"][i]],
                p_idx[g["problem_id"][i]],
                _OUTCOME_INDEX[g["outcome"][i]],
                _PHASE_INDEX[g["phase"][i]],
            ] += g["sample_index_count"][i]
        out.append(VariantCounts(variant, seeds, problems, counts))
    return out


def seed_pass_at_1(vc: VariantCounts) -> np.ndarray:
    """pass@1 per seed: mean over problems of c/n (INFRA_ERROR samples excluded from n and c)."""
    n, c = vc.scored, vc.passes
    ok = n > 0
    empty = [s for s, row in zip(vc.seeds, ok) if not row.any()]
    if empty:
        raise ValueError(
            f"{vc.variant.label!r}: every sample of seed(s) {empty} is INFRA_ERROR; nothing to score (check the sandbox)"
        )
    rate = np.divide(c, n, out=np.zeros(n.shape), where=ok)
    return rate.sum(axis=1) / ok.sum(axis=1)


def seed_category_counts(vc: VariantCounts) -> np.ndarray:
    """[seed, outcome, phase]: sum over scored problems of (samples with that outcome and phase) / n."""
    n = vc.scored.astype(float)
    ok = n > 0
    per_problem = np.divide(vc.counts, n[:, :, None, None], out=np.zeros(vc.counts.shape), where=ok[:, :, None, None])
    return per_problem.sum(axis=1)


def z_quantile(p: float) -> float:
    """Standard normal quantile (statistics.NormalDist: pure Python, the same on every machine)."""
    return NormalDist().inv_cdf(p)


def standard_error(scores: Sequence[float] | np.ndarray) -> float | None:
    """SE of the mean of per-problem scores: sd(ddof=1) / sqrt(P). None with fewer than two problems."""
    x = np.asarray(scores, dtype=float)
    if x.size < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(x.size))


def normal_ci(mean: float, se: float | None, level: float) -> list[float] | None:
    """Normal (CLT) interval mean +- z_{(1+level)/2} * se; None when se is undefined."""
    if se is None:
        return None
    half = z_quantile((1 + level) / 2) * se
    return [mean - half, mean + half]


def problem_scores(vc: VariantCounts, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(per-problem score = mean over valid seeds of c/n, mask of problems with a valid seed).

    valid[seed, problem] defaults to the (problem, seed) pairs of this variant with a scored sample.
    """
    valid = vc.scored > 0 if valid is None else valid
    rate = np.divide(vc.passes, vc.scored, out=np.zeros(valid.shape), where=valid)
    used = valid.sum(axis=0)
    keep = used > 0
    return rate.sum(axis=0)[keep] / used[keep], keep


def prediction_variance(vc: VariantCounts, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per problem (those with a valid seed): (unbiased within-problem sample variance s^2 of one sample's
    pass/fail, the variance of the problem's score that it causes). None if some problem has < 2 samples.

    s^2 = N/(N-1) * p(1-p) over the N pooled samples of the valid seeds (E[s^2] = p(1-p)); the score (mean over
    S seeds of c_s/n_s) then has variance s^2 * (1/S^2) * sum_s 1/n_s.
    """
    n = np.where(valid, vc.scored, 0)
    c = np.where(valid, vc.passes, 0)
    keep = valid.any(axis=0)
    n_tot, c_tot = n.sum(axis=0)[keep], c.sum(axis=0)[keep]
    if n_tot.size == 0 or n_tot.min() < 2:
        return None
    p = c_tot / n_tot
    s2 = n_tot / (n_tot - 1) * p * (1 - p)
    seeds = valid.sum(axis=0)[keep]
    inv_n = np.divide(1.0, n, out=np.zeros(n.shape), where=n > 0).sum(axis=0)[keep]
    return s2, s2 * inv_n / seeds**2


def clustered_summary(vc: VariantCounts, level: float = 0.95) -> dict[str, Any]:
    """pass@1 over problems with its clustered SE and a normal CI (JSON-ready)."""
    scores, keep = problem_scores(vc)
    mean = float(scores.mean())
    se = standard_error(scores)
    return {
        "problem_mean": mean,  # mean of per-problem scores; equals `mean` unless INFRA_ERROR left out a seed
        "se": se,
        "se_method": "clustered by problem: sd(per-problem mean over all its samples) / sqrt(problems)",
        "ci": normal_ci(mean, se, level),
        "ci_level": level,
        "ci_method": "normal (CLT): mean +- z * SE",
        "problems_scored": int(keep.sum()),
    }


def _lattice(d: np.ndarray, max_denominator: int = 1000) -> tuple[int, np.ndarray] | None:
    """(L, |d| * L as integers) for the smallest L <= max_denominator that puts every |d| on the grid 1/L, or None.
    Per-problem scores are ratios c/n of small integers, so their differences usually lie on such a grid."""
    a = np.abs(d)
    for L in range(1, max_denominator + 1):
        u = a * L
        r = np.rint(u)
        # on the grid to float precision, and no nonzero difference rounded away to 0 units
        if np.all(np.abs(u - r) <= 1e-9 * np.maximum(1.0, u)) and np.all(r >= 1):
            return L, r.astype(np.int64)
    return None


def _lattice_p(units: np.ndarray, observed_units: int) -> float:
    """P(|sum of +-units| >= observed) under fair independent signs: the exact distribution of the sum, built one
    difference at a time over the integer sums (a convolution with two point masses)."""
    total = int(units.sum())
    prob = np.zeros(2 * total + 1)
    prob[total] = 1.0  # index = sum + total
    for u in units.tolist():
        nxt = np.zeros_like(prob)
        nxt[u:] += 0.5 * prob[: prob.size - u]
        nxt[: prob.size - u] += 0.5 * prob[u:]
        prob = nxt
    sums = np.arange(-total, total + 1)
    # never 0: the observed sign vector itself has probability 2^-m (which underflows past m ~ 1074)
    return float(min(1.0, max(prob[np.abs(sums) >= observed_units].sum(), np.finfo(float).tiny)))


def sign_flip_test(
    diffs: Sequence[float] | np.ndarray, exact_max: int = 20, draws: int = 100_000, seed: int = 0,
    lattice_max: int = 50_000_000,
) -> dict[str, Any]:
    """Two-sided paired sign-flip permutation test of |sum d| (H0: each problem's difference is as likely + as -).

    Exact over all 2^m sign vectors of the m nonzero differences when m <= exact_max. Above that, exact too when
    the differences lie on a grid 1/L (ratios of small integers: k samples x seeds per problem) and the sum's
    distribution costs at most `lattice_max` cell updates (m x (2 x sum of |d| x L + 1); 0: never); otherwise
    Monte-Carlo with `draws` seeded sign vectors, p = (1 + hits) / (1 + draws), with its MC standard error.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.abs(d) > _TIE_TOL]
    m = int(d.size)
    if m == 0:
        return {"p_value": 1.0, "method": "exact", "nonzero": 0, "draws": None, "mc_error": None}
    observed = abs(float(d.sum()))
    tol = _TIE_TOL * max(1.0, float(np.abs(d).sum()))  # sums of the same ratios must tie, whatever the order
    if m <= exact_max:
        sums = np.zeros(1)
        for x in d:
            sums = np.concatenate([sums + x, sums - x])
        hits = int((np.abs(sums) >= observed - tol).sum())
        return {"p_value": hits / 2**m, "method": "exact", "nonzero": m, "draws": None, "mc_error": None}
    grid = _lattice(d) if lattice_max > 0 else None
    if grid is not None and m * (2 * int(grid[1].sum()) + 1) <= lattice_max:
        L, units = grid
        observed_units = abs(int((np.sign(d).astype(np.int64) * units).sum()))
        return {"p_value": _lattice_p(units, observed_units), "method": "exact", "grid": f"1/{L}", "nonzero": m,
                "draws": None, "mc_error": None}
    if draws < 1:
        raise ValueError(f"sign_flip_test: draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 2_000_000 // m)  # bounds the sign matrix to ~16 MB
    for start in range(0, draws, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, draws - start), m)) * 2 - 1
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
    p = (1 + hits) / (1 + draws)
    return {"p_value": p, "method": "monte-carlo", "nonzero": m, "draws": draws, "seed": seed,
            "mc_error": math.sqrt(p * (1 - p) / draws)}


def minimum_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """(z_{1-alpha/2} + z_{power}) * se: the smallest true change detected with probability `power` (two-sided)."""
    return (z_quantile(1 - alpha / 2) + z_quantile(power)) * se


def power_analysis(
    diffs: np.ndarray, prediction: tuple[np.ndarray, np.ndarray] | None, samples_per_problem: int | None,
    alpha: float, power: float,
) -> dict[str, Any]:
    """Noise split, MDE, and the problems (or samples per problem) needed to detect the observed delta."""
    p_count = int(diffs.size)
    z = z_quantile(1 - alpha / 2) + z_quantile(power)
    delta = float(diffs.mean())
    var = float(diffs.var(ddof=1)) if p_count > 1 else None
    se = math.sqrt(var / p_count) if var is not None else None
    out: dict[str, Any] = {"alpha": alpha, "power": power, "z_sum": z, "samples_per_problem": samples_per_problem}
    if se is None or se == 0:
        why = "fewer than 2 problems" if se is None else "every problem's difference is the same (paired SE = 0)"
        out.update(mde=None, mde_undefined=why)
    else:
        out.update(mde=minimum_detectable_effect(se, alpha, power))
    pred_var = data_var = per_sample = None
    if prediction is not None and var is not None:
        (s2_base, v_base), (s2_other, v_other) = prediction
        pred_var = float((v_base + v_other).mean())
        data_var = var - pred_var
        per_sample = float((s2_base + s2_other).mean())
    out["noise"] = {
        "total_var": var,
        "prediction_var": pred_var,  # mean over problems of the within-problem sampling variance of d
        "data_var": data_var,  # the rest: which problems were drawn (may be < 0 as an estimate)
        "total_se": se,
        "prediction_se": math.sqrt(pred_var / p_count) if pred_var is not None else None,
        "data_se": math.sqrt(max(data_var, 0.0) / p_count) if data_var is not None else None,
        "prediction_undefined": None if prediction is not None else "needs >= 2 samples per problem (k x seeds)",
    }
    if var is None or abs(delta) <= _TIE_TOL:
        out["problems_needed"] = None
        out["samples_per_problem_needed"] = None
        out["needed_undefined"] = "observed delta is 0" if var is not None else "fewer than 2 problems"
        return out
    out["problems_needed"] = max(2, math.ceil(z**2 * var / delta**2 - 1e-9))
    room = delta**2 * p_count / z**2 - (data_var if data_var is not None else 0.0)
    if per_sample is None:
        out["samples_per_problem_needed"] = None
        out["needed_undefined"] = "no prediction-noise estimate (needs >= 2 samples per problem)"
    elif room <= 0:
        out["samples_per_problem_needed"] = None
        out["needed_undefined"] = ("data noise alone exceeds what this problem count allows: more samples per problem "
                                   "cannot reach it")
    else:
        out["samples_per_problem_needed"] = max(1, math.ceil(per_sample / room - 1e-9))
        out["needed_undefined"] = None
    return out


def category_totals_se(vc: VariantCounts) -> np.ndarray:
    """[outcome]: SE over problems of a category's per-problem count (its fraction of each problem's samples,
    averaged over seeds; summed over P problems, so SE = sqrt(P) * sd(per-problem fractions))."""
    n = vc.scored.astype(float)
    ok = n > 0
    frac = np.divide(vc.counts.sum(axis=3), n[:, :, None], out=np.zeros(vc.counts.shape[:3]), where=ok[:, :, None])
    used = ok.sum(axis=0)
    keep = used > 0
    per_problem = frac.sum(axis=0)[keep] / used[keep][:, None]  # [P, O]
    if per_problem.shape[0] < 2:
        return np.full(len(OUTCOMES), np.nan)
    return np.sqrt(per_problem.shape[0]) * per_problem.std(axis=0, ddof=1)


def summarize_variant(vc: VariantCounts, level: float = 0.95) -> dict[str, Any]:
    """All per-variant numbers of the report (JSON-ready). `pass_at_1` keeps mean/std/n_seeds (across seeds) and
    adds the clustered SE over problems with a normal CI (clustered_summary)."""
    p1 = seed_pass_at_1(vc)
    cat_se = category_totals_se(vc)
    cat = seed_category_counts(vc)  # [S, O, phase]
    by_outcome = cat.sum(axis=2)  # [S, O]
    failures = cat[:, _FAIL_IDX, :]  # [S, F, phase]
    samples = vc.counts.sum(axis=(2, 3))  # [S, P]
    k = sorted({int(x) for x in np.unique(samples)})
    seed_key = [str(s) for s in vc.seeds]
    return {
        "label": vc.variant.label,
        "model": vc.variant.model,
        "adapter": vc.variant.adapter,
        "seeds": list(vc.seeds),
        "problems": len(vc.problems),
        "samples_per_problem": k[0] if len(k) == 1 else k,
        "pass_at_1": {**mean_std(p1).to_dict(), "per_seed": dict(zip(seed_key, p1.tolist())),
                      **clustered_summary(vc, level)},
        "failures": {
            o.value: {**mean_std(by_outcome[:, _OUTCOME_INDEX[o.value]]).to_dict(),
                      "per_seed": dict(zip(seed_key, by_outcome[:, _OUTCOME_INDEX[o.value]].tolist())),
                      **_category_se(float(by_outcome[:, _OUTCOME_INDEX[o.value]].mean()),
                                     float(cat_se[_OUTCOME_INDEX[o.value]]), level)}
            for o in FAILURES
        },
        "failures_total": mean_std(failures.sum(axis=(1, 2))).to_dict(),
        "phases": {
            name: {
                "total": mean_std(failures[:, :, j].sum(axis=1)).to_dict(),
                "by_category": {o.value: mean_std(failures[:, f, j]).to_dict() for f, o in enumerate(FAILURES)},
            }
            for j, name in enumerate(PHASE_NAMES)
        },
        "infra": {
            "samples": int(vc.infra.sum()),
            "per_seed": dict(zip(seed_key, vc.infra.sum(axis=1).tolist())),
            "excluded_problem_seeds": int((vc.scored == 0).sum()),  # (problem, seed) with only INFRA_ERROR
        },
    }


def _category_se(mean: float, se: float, level: float) -> dict[str, Any]:
    se_or_none = None if math.isnan(se) else se
    return {"se": se_or_none, "ci": normal_ci(mean, se_or_none, level)}


@dataclass(frozen=True)
class PairedScores:
    problems: tuple[str, ...]  # problems scored on both sides
    seeds: tuple[int, ...]
    base: np.ndarray  # per-problem mean over seeds of c/n
    other: np.ndarray
    valid: np.ndarray  # [seed, problem] (over all problems of both variants): both sides have a scored sample
    excluded: tuple[str, ...]  # problems with no seed where both sides have a scored sample

    @property
    def diffs(self) -> np.ndarray:
        return self.other - self.base


def check_paired(base: VariantCounts, other: VariantCounts) -> None:
    """Both variants must cover exactly the same problems and seeds (hence the same (problem, seed) set)."""
    b, o = base.variant.label, other.variant.label
    if base.variant.model != other.variant.model:
        raise ValueError(
            f"mixed models: {o!r} was evaluated on model {other.variant.model!r} but the base {b!r} is model "
            f"{base.variant.model!r}; compare an adapter only against its own base model"
        )
    if set(base.problems) != set(other.problems):
        only_b, only_o = set(base.problems) - set(other.problems), set(other.problems) - set(base.problems)
        raise ValueError(
            f"results from a different problem set: base {b!r} has {len(base.problems)} problems, {o!r} has "
            f"{len(other.problems)}; only in base: {_some(only_b)}; only in {o!r}: {_some(only_o)}"
        )
    if base.seeds != other.seeds:
        raise ValueError(
            f"results from different seeds: base {b!r} has run_seed {list(base.seeds)}, {o!r} has {list(other.seeds)}; "
            "a paired comparison needs the same seeds"
        )


def paired_scores(base: VariantCounts, other: VariantCounts) -> PairedScores:
    check_paired(base, other)
    valid = (base.scored > 0) & (other.scored > 0)
    sb, keep = problem_scores(base, valid)
    so, _ = problem_scores(other, valid)
    problems = tuple(p for p, k in zip(base.problems, keep) if k)
    excluded = tuple(p for p, k in zip(base.problems, keep) if not k)
    if not problems:
        raise ValueError(f"{other.variant.label!r} vs {base.variant.label!r}: no problem has a scored sample on both sides")
    return PairedScores(problems, base.seeds, sb, so, valid, excluded)


def paired_bootstrap_ci(
    diffs: Sequence[float] | np.ndarray, samples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(diffs), resampling problems with replacement. Deterministic for a seed."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("paired_bootstrap_ci: no paired problems")
    if samples < 1:
        raise ValueError(f"paired_bootstrap_ci: samples must be >= 1, got {samples}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // d.size)  # bounds the index matrix to ~16 MB
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        means[start : start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as wins:losses | each side equally likely)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def majority_outcome(counts: np.ndarray) -> str:
    """The most frequent model-failure category in counts[..., outcome, phase]; "PASS" if there is none.

    Ties go to the category listed first in Outcome.
    """
    per = counts.reshape(-1, len(OUTCOMES), len(PHASES)).sum(axis=(0, 2))[_FAIL_IDX]
    return Outcome.PASS.value if per.sum() == 0 else FAILURES[int(np.argmax(per))].value


def decompose(base: VariantCounts, other: VariantCounts, paired: PairedScores) -> dict[str, Any]:
    """Which failure categories the gained and lost problems came from (per problem: the majority category).

    gained: problems whose adapter score is higher; counted by the base's majority failure category.
    lost: problems whose adapter score is lower; counted by the adapter's majority failure category (what they
    turned into) and by the base's majority outcome (usually PASS).
    Only seeds where both sides have a scored sample count.
    """
    p_idx = {p: i for i, p in enumerate(base.problems)}
    d = paired.diffs
    out: dict[str, Any] = {}
    for name, mask in (("gained", d > _TIE_TOL), ("lost", d < -_TIE_TOL)):
        ids = [p for p, m in zip(paired.problems, mask) if m]
        from_base: Counter[str] = Counter()
        to_other: Counter[str] = Counter()
        for p in ids:
            j = p_idx[p]
            seeds = paired.valid[:, j]
            from_base[majority_outcome(base.counts[seeds, j])] += 1
            to_other[majority_outcome(other.counts[seeds, j])] += 1
        entry: dict[str, Any] = {"problems": len(ids), "problem_ids": ids, "by_base_category": _ordered(from_base)}
        if name == "lost":
            entry["by_adapter_category"] = _ordered(to_other)
        out[name] = entry
    return out


def _ordered(c: Counter[str]) -> dict[str, int]:
    order = {o.value: i for i, o in enumerate(OUTCOMES)}
    return {k: c[k] for k in sorted(c, key=lambda k: (-c[k], order[k]))}


@dataclass(frozen=True)
class CompareOptions:
    bootstrap_samples: int = 10_000  # MC error of a 2.5% percentile at B=1e4 is ~1/10 of a CI half-width
    bootstrap_seed: int = 0  # the CI is a function of the data and this seed
    ci_level: float = 0.95
    alpha: float = 0.05  # "beyond noise": the permutation test's p below this
    power: float = 0.8  # for the minimum detectable effect: (z_0.975 + z_0.8) = 2.80 x paired SE
    exact_max: int = 20  # exact permutation test up to 2^20 (~1e6) sign vectors, 8 MB; Monte-Carlo above
    permutation_draws: int = 100_000  # MC error of p near 0.05 is sqrt(.05 * .95 / 1e5) ~ 0.0007
    permutation_seed: int = 0  # the Monte-Carlo p is a function of the data and this seed

    def __post_init__(self) -> None:
        if self.bootstrap_samples < 100:
            raise ValueError(f"bootstrap_samples must be >= 100, got {self.bootstrap_samples}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"ci_level must be in (0, 1), got {self.ci_level}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if not 0 <= self.exact_max <= 24:
            raise ValueError(f"exact_max must be in [0, 24] (2^24 sums = 128 MB), got {self.exact_max}")
        if self.permutation_draws < 1000:
            raise ValueError(f"permutation_draws must be >= 1000, got {self.permutation_draws}")


def _samples_per_problem(vc: VariantCounts) -> int | None:
    """k x seeds when every (seed, problem) has the same k; None otherwise."""
    k = np.unique(vc.counts.sum(axis=(2, 3)))
    return int(k[0]) * len(vc.seeds) if k.size == 1 else None


def compare(base: VariantCounts, other: VariantCounts, options: CompareOptions = CompareOptions()) -> dict[str, Any]:
    """Paired comparison of `other` against `base` on the same problems and seeds (JSON-ready)."""
    paired = paired_scores(base, other)
    d = paired.diffs
    delta = float(d.mean())
    lo, hi = paired_bootstrap_ci(d, options.bootstrap_samples, options.bootstrap_seed, options.ci_level)
    se = standard_error(d)
    ci_normal = normal_ci(delta, se, options.ci_level)
    gained, lost = int((d > _TIE_TOL).sum()), int((d < -_TIE_TOL).sum())
    ties = len(d) - gained - lost
    sign_p = sign_test(gained, lost)
    perm = sign_flip_test(d, options.exact_max, options.permutation_draws, options.permutation_seed)
    p = perm["p_value"]
    binary = bool(np.all(np.isin(paired.base, (0.0, 1.0))) and np.all(np.isin(paired.other, (0.0, 1.0))))
    secondary = "exact McNemar (sign test on discordant problems)" if binary else "exact sign test over problems"
    test = f"paired sign-flip permutation test over problems ({perm['method']}, {perm['nonzero']} nonzero)"
    pred_b, pred_o = prediction_variance(base, paired.valid), prediction_variance(other, paired.valid)
    power = power_analysis(d, (pred_b, pred_o) if pred_b is not None and pred_o is not None else None,
                           _samples_per_problem(base), options.alpha, options.power)
    corr = None
    if len(d) > 1 and paired.base.std() > 0 and paired.other.std() > 0:
        corr = float(np.corrcoef(paired.base, paired.other)[0, 1])
    beyond = p < options.alpha
    b, o = base.variant.label, other.variant.label
    if beyond:
        verdict_words = f"beyond noise ({'an improvement' if delta > 0 else 'a regression'})"
    else:
        verdict_words = f"within noise (p >= {options.alpha:g})"
    mc = f" +- {perm['mc_error']:.2g} (MC, {perm['draws']} draws)" if perm["method"] == "monte-carlo" else ""
    ci_words = (f"{options.ci_level:.0%} CI [{ci_normal[0]:+.4f}, {ci_normal[1]:+.4f}] normal, paired SE {se:.4f}"
                if ci_normal is not None else "paired SE undefined")
    if power["mde"] is not None:
        mde_words = (f"this evaluation could not have detected a change smaller than {100 * power['mde']:.1f} points "
                     f"(MDE at {options.power:.0%} power, alpha {options.alpha:g})")
    else:
        mde_words = f"its minimum detectable effect is undefined ({power['mde_undefined']})"
    sentence = (
        f"{o} vs {b}: delta pass@1 = {delta:+.4f} ({ci_words}; bootstrap [{lo:+.4f}, {hi:+.4f}], B="
        f"{options.bootstrap_samples}) over {len(d)} problems x {len(paired.seeds)} seeds; {gained} problems gained, "
        f"{lost} lost, {ties} unchanged; permutation p = {p:.4g}{mc} ({secondary} p = {sign_p:.4g}): "
        f"{verdict_words}; {mde_words}."
    )
    return {
        "base": b,
        "adapter": o,
        "problems": len(d),
        "seeds": list(paired.seeds),
        "excluded_problems": list(paired.excluded),
        "base_pass_at_1": float(paired.base.mean()),
        "adapter_pass_at_1": float(paired.other.mean()),
        "delta": delta,
        "se": se,  # paired SE: sd(per-problem differences) / sqrt(problems)
        "ci": [lo, hi],  # percentile bootstrap over problems
        "ci_method": "percentile bootstrap over problems",
        "ci_normal": ci_normal,  # delta +- z * se
        "ci_level": options.ci_level,
        "bootstrap_samples": options.bootstrap_samples,
        "bootstrap_seed": options.bootstrap_seed,
        "correlation": corr,  # Pearson, per-problem scores; None when a side is constant
        "noise": power["noise"],
        "mde": power["mde"],
        "power": power,
        "gained": gained,
        "lost": lost,
        "ties": ties,
        "test": test,
        "p_value": p,  # the primary (permutation) test's
        "permutation": perm,
        "secondary_test": secondary,
        "sign_test_p_value": sign_p,
        "alpha": options.alpha,
        "verdict": "beyond noise" if beyond else "within noise",
        "direction": "improvement" if delta > 0 else "regression" if delta < 0 else "none",
        "sentence": sentence,
        "decomposition": decompose(base, other, paired),
    }


def choose_base(variants: Sequence[VariantCounts], base: str | None = None) -> VariantCounts | None:
    """The reference variant: the one named `base` (a base model name or an adapter name), else the only
    variant with adapter null. None when there is nothing to compare (a single base model, no adapters)."""
    if base is not None:
        hits = [v for v in variants if v.variant.label == base]
        if not hits:
            raise ValueError(f"base {base!r} not found; variants in the results: {[v.variant.label for v in variants]}")
        if len(hits) > 1:
            raise ValueError(f"base {base!r} is ambiguous: {[v.variant for v in hits]}")
        chosen = hits[0]
    else:
        bases = [v for v in variants if v.variant.is_base]
        if len(bases) > 1:
            raise ValueError(
                f"mixed models: the results hold base rows (adapter null) of {[v.variant.model for v in bases]}; "
                "pass one model's results, or name the reference with --base"
            )
        if not bases:
            if len(variants) > 1:
                raise ValueError(
                    f"no base rows (adapter null) in the results; adapters {[v.variant.label for v in variants]} "
                    "need a reference: name one with --base"
                )
            return None
        chosen = bases[0]
    for v in variants:
        if v is not chosen:
            check_paired(chosen, v)
    return chosen
