"""`eval.until_decided`: add seeds in rounds until each adapter-vs-base comparison is decided, with a stopping rule
that stays valid however often it looks.

The rule. Look r (r = 1 after the first `eval.seeds`, then one look per added round) computes each comparison
(eval.stats.compare over every seed so far) and its interval delta +- t * SE at level 1 - alpha_r (t: Student's
quantile with problems - 1 degrees of freedom; the report's normal interval was measured anti-conservative at 40
problems, 5.6% false decisions at a nominal 5%, tests/test_sequential.py), where

    alpha_r = alpha * 6 / (pi^2 r^2)          (sum over r >= 1 of alpha_r = alpha)

so the chance that *any* look's interval misses the true delta is at most alpha (a union bound over the looks: a
confidence sequence over discrete looks; as exact as the t interval at each look, a CLT approximation). Stopping
when an interval excludes 0 is then a level-alpha decision under optional stopping; the fixed-sample p-value and
CI of the final report are not (they ignore that the data chose when to stop), which the report says in its first
lines. The price: look 1 is already stricter than a plain
test (alpha_1 = 0.61 alpha: z 2.16 instead of 1.96 at alpha 0.05), look 5 uses z 2.82 (a little more as t).

A comparison stops (the first that applies, in this order):
    decided   the look's interval delta +- t_r * SE excludes 0 (SE: the paired SE over problems, eval.stats)
    precise   the look's MDE (t_r + z_power) * SE is at most eval.target_mde: a change that large would have shown
    futile    the problem-to-problem spread alone (the data-noise part of the SE, eval-arena's split) would keep
              the interval over 0 even if delta moved a whole sampling-noise interval away from 0
              (t_r * data_SE >= |delta| + t_r * prediction_SE), and keeps the MDE above the target: more seeds
              on these problems are not expected to decide it, more problems would (stopping for futility never
              makes a false "decided")
    budget    the seeds reached eval.max_seeds
The eval stops when every comparison has stopped. Rounds add whole seeds (every problem, every variant), so each
seed keeps a per-seed pass@1 and results stay ordinary eval results; it does not steer samples toward the
problems where variants disagree (that would leave seeds without every problem).

Each round is an ordinary eval pass over its new seeds (eval/run.py): adapters are loaded and checked again per
round (a hot-load, or in merged mode one more engine start per round), and every round's rows are plain eval
results, so a report rebuilt from the folders shows every seed.

Pure functions over report comparisons: no engine, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from eval.stats import z_quantile

STOP_REASONS = ("decided", "precise", "futile", "budget")


def look_alpha(alpha: float, look: int) -> float:
    """alpha_r of look r (1-based): alpha * 6 / (pi^2 r^2); over all looks they sum to alpha."""
    if look < 1:
        raise ValueError(f"look must be >= 1, got {look}")
    return alpha * 6.0 / (math.pi**2 * look**2)


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile, Cornish-Fisher expansion in the normal quantile (Abramowitz & Stegun 26.7.5; error
    below 1e-3 for df >= 5 at the tails used here). df <= 0: the normal quantile."""
    z = z_quantile(p)
    if df <= 0:
        return z
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def next_seeds(seeds: Sequence[int], round_seeds: int, max_seeds: int) -> list[int]:
    """The seeds a round adds: the next integers above every seed so far, at most up to max_seeds in all."""
    count = min(round_seeds, max_seeds - len(seeds))
    top = max(seeds)
    return [top + 1 + i for i in range(max(count, 0))]


@dataclass(frozen=True)
class Decision:
    adapter: str
    base: str
    look: int
    seeds: int
    delta: float
    se: float | None
    alpha_look: float
    z_look: float  # the look's quantile (Student t, problems - 1 df)
    interval: list[float] | None  # delta +- z_look * se: the look's confidence-sequence interval
    mde_look: float | None  # (z_look + z_power) * se
    data_se: float | None  # the problem-to-problem part of the SE
    stop: str | None  # one of STOP_REASONS, or None: needs more seeds


def decide(comparison: dict[str, Any], look: int, seeds: int, alpha: float, power: float, target_mde: float,
           max_seeds: int) -> Decision:
    """One comparison (eval.stats.compare's dict) at look `look` with `seeds` seeds so far."""
    a = look_alpha(alpha, look)
    z = t_quantile(1 - a / 2, int(comparison.get("problems", 0)) - 1)
    z_pow = z_quantile(power)
    delta, se = float(comparison["delta"]), comparison["se"]
    noise = comparison.get("noise") or {}
    data_se, pred_se = noise.get("data_se"), noise.get("prediction_se")
    interval = mde = None
    stop = None
    if se is not None and se > 0:
        interval = [delta - z * se, delta + z * se]
        mde = (z + z_pow) * se
        if interval[0] > 0 or interval[1] < 0:
            stop = "decided"
        elif target_mde > 0 and mde <= target_mde:
            stop = "precise"
        elif data_se is not None and pred_se is not None and z * data_se >= abs(delta) + z * pred_se and (
                target_mde <= 0 or (z + z_pow) * data_se > target_mde):
            stop = "futile"
    elif se == 0 and abs(delta) > 0:  # every problem moved by the same nonzero amount
        interval, mde, stop = [delta, delta], 0.0, "decided"
    if stop is None and seeds >= max_seeds:
        stop = "budget"
    return Decision(comparison["adapter"], comparison["base"], look, seeds, delta, se, a, z, interval, mde, data_se,
                    stop)


def words(d: Decision) -> str:
    """One line for a report's status."""
    iv = f"[{d.interval[0]:+.4f}, {d.interval[1]:+.4f}]" if d.interval else "undefined (SE undefined)"
    why = {
        "decided": "its interval excludes 0",
        "precise": "its MDE reached the target",
        "futile": "the spread between problems alone keeps it undecided: more problems are needed, not more seeds",
        "budget": "eval.max_seeds reached, still undecided",
        None: "undecided",
    }[d.stop]
    mde = f", MDE {100 * d.mde_look:.1f} points" if d.mde_look is not None else ""
    return (f"until_decided: {d.adapter} vs {d.base} after {d.seeds} seeds (look {d.look}, level "
            f"{1 - d.alpha_look:.4f}): delta {d.delta:+.4f}, interval {iv}{mde}: {d.stop or 'going on'} ({why})")


def record(looks: list[list[Decision]], alpha: float, power: float, target_mde: float, max_seeds: int,
           round_seeds: int) -> dict[str, Any]:
    """The report's `until_decided` section: the rule, every look, and why it stopped."""
    return {
        "rule": "confidence sequence over looks: alpha_r = alpha * 6 / (pi^2 r^2) (union bound; valid under "
                "optional stopping)",
        "alpha": alpha, "power": power, "target_mde": target_mde, "max_seeds": max_seeds, "round_seeds": round_seeds,
        "looks": [[asdict(d) for d in ds] for ds in looks],
        "final": [asdict(d) for d in looks[-1]] if looks else [],
        "seeds_used": looks[-1][0].seeds if looks and looks[-1] else None,
    }
