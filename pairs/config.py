"""The pairs stage's typed config and its closed set of failure categories.

A category is what the balancer balances: the rejected completion's outcome (`category_key: outcome`, e.g.
"NAME_ERROR"), or its outcome and the phase it failed in (`category_key: outcome+phase`, e.g.
"NAME_ERROR/definition", "ASSERTION_FAIL/test"; outcomes with no phase, like NO_CODE, keep the bare name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gen.shards import check_output_path
from sandbox import Outcome, Phase

BALANCES = ("uniform", "proportional", "weights")
CATEGORY_KEYS = ("outcome", "outcome+phase")
PROMPT_FORMATS = ("auto", "chat", "text")
PHASES = tuple(p.value for p in Phase)


def rejectable_outcomes(exclude: list[str] | tuple[str, ...]) -> list[str]:
    """Outcome names a rejected completion may have: every model failure not in `exclude` (never INFRA_ERROR)."""
    return [o.name for o in Outcome if o.is_model_failure and o.name not in exclude]


def category_names(category_key: str, outcomes: list[str]) -> list[str]:
    """Every category the key can produce from these outcomes, in a fixed order."""
    if category_key == "outcome":
        return list(outcomes)
    return [name for o in outcomes for name in (o, *(f"{o}/{p}" for p in PHASES))]


def category_of(outcome: str, phase: str | None, category_key: str) -> str:
    if category_key == "outcome" or phase is None:
        return outcome
    return f"{outcome}/{phase}"


@dataclass(frozen=True)
class PairsConfig:
    """`python -m pairs --config FILE [pairs.key=value ...]`; the YAML section is `pairs:`."""

    inputs: list[str] = field(default_factory=list)  # gen run folders (local or s3://...); pooled together
    out: str = "runs/pairs"  # folder for pairs.parquet, report.json, report.md
    num_pairs: int = 500  # the reference result came from 500 pairs
    # uniform: equal share per failure category present; proportional: share follows the pool's counts;
    # weights: share follows `weights` (categories not named there weigh 1.0, so {NAME_ERROR: 3} up-weights one)
    balance: str = "uniform"
    weights: dict[str, float] = field(default_factory=dict)
    category_key: str = "outcome"  # outcome | outcome+phase (definition-time vs test-time failures apart)
    # NO_CODE is excluded by default: "code beats no code" teaches the answer format, which a chat model already
    # follows, not correctness, and such pairs are trivially separable (they would dominate the DPO margin).
    # TIMEOUT stays in: the sandbox's timeout is CPU time, not wall time, so it marks a real infinite or
    # exponential loop rather than a busy machine. INFRA_ERROR is never used, whatever this says.
    exclude_outcomes: list[str] = field(default_factory=lambda: ["NO_CODE"])
    # 500 pairs over ~60 in-window HumanEval train problems needs ~8 each; more lets a few problems dominate
    max_pairs_per_problem: int = 8
    # Only problems the model solves 5-95% of the time (its real confidence gap): below that a pass is often
    # luck on weak tests, above it the model already knows the answer. pass rate = PASS / non-INFRA rows.
    pass_rate_min: float = 0.05
    pass_rate_max: float = 0.95
    # chosen_tokens / rejected_tokens bounds: without them DPO learns "shorter wins" (failures that crash
    # early are often short, or ramble to max_tokens)
    length_ratio_min: float = 0.5
    length_ratio_max: float = 2.0
    # pairs one completion may appear in (as chosen or rejected); 1 would starve hard problems with few passes
    max_reuse: int = 2
    dedup: bool = True  # drop exact and whitespace-only duplicate completions within a problem
    seed: int = 0
    # chat: TRL conversational messages; text: the exact prompt string the samples were generated from.
    # auto: chat when every input run's manifest says prompt_style=chat, else text.
    prompt_format: str = "auto"
    problems: str | None = None  # problem set to rebuild chat messages from (default: the runs' manifests)
    # Leakage guard: the problems the adapter will be evaluated on. Explicit ids, and/or a problem set whose
    # eval split (eval_fraction, split_seed as in gen/eval) -- or all of it, when eval_fraction is unset.
    eval_ids: list[str] = field(default_factory=list)
    eval_problems: str | None = None
    eval_fraction: float | None = None
    split_seed: int = 0
    allow_leakage: bool = False  # proceed even when pair problems are in the eval set (loud warning + report)
    # Naming no eval set (eval_ids / eval_problems) is refused: the guard cannot check what it is not given.
    # true: write pairs without the guard; the report's first warning says so.
    allow_no_eval_set: bool = False
    # Use a gen run that is not complete (manifest complete=false, failed or missing units): its pool is a biased
    # subset (the units that finished first or did not crash), so only when asked; the report says so first.
    allow_incomplete: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("pairs.inputs must name at least one gen run folder, got []")
        dupes = sorted({u for u in self.inputs if list(self.inputs).count(u) > 1})
        if dupes:
            raise ValueError(f"pairs.inputs names the same run folder twice: {dupes}")
        if not self.out:
            raise ValueError("pairs.out must name an output folder")
        check_output_path("pairs.out", self.out)  # a relative out inside a `ray job` working-dir copy is lost
        if self.num_pairs <= 0:
            raise ValueError(f"pairs.num_pairs must be > 0, got {self.num_pairs}")
        if self.balance not in BALANCES:
            raise ValueError(f"pairs.balance must be one of {BALANCES}, got {self.balance!r}")
        if self.category_key not in CATEGORY_KEYS:
            raise ValueError(f"pairs.category_key must be one of {CATEGORY_KEYS}, got {self.category_key!r}")
        names = [o.name for o in Outcome]
        bad = [o for o in self.exclude_outcomes if o not in names]
        if bad:
            raise ValueError(f"pairs.exclude_outcomes: unknown outcome(s) {bad}; known: {names}")
        if "PASS" in self.exclude_outcomes:
            raise ValueError("pairs.exclude_outcomes: PASS is the chosen side, never a rejected outcome")
        usable = rejectable_outcomes(self.exclude_outcomes)
        if not usable:
            raise ValueError(f"pairs.exclude_outcomes={self.exclude_outcomes} leaves no failure to reject")
        if self.weights and self.balance != "weights":
            raise ValueError(f"pairs.weights is only used with balance=weights, got balance={self.balance!r}")
        valid = category_names(self.category_key, usable)
        unknown = sorted(k for k in self.weights if k not in valid)
        if unknown:
            raise ValueError(
                f"pairs.weights: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} for "
                f"category_key={self.category_key!r} and exclude_outcomes={self.exclude_outcomes}; valid: {valid}"
            )
        for k, w in self.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"pairs.weights[{k!r}] must be a finite number >= 0, got {w!r}")
        if self.max_pairs_per_problem <= 0:
            raise ValueError(f"pairs.max_pairs_per_problem must be > 0, got {self.max_pairs_per_problem}")
        if not 0.0 <= self.pass_rate_min <= self.pass_rate_max <= 1.0:
            raise ValueError(
                "pairs.pass_rate_min/pass_rate_max must satisfy 0 <= min <= max <= 1, got "
                f"{self.pass_rate_min}, {self.pass_rate_max}"
            )
        if not 0.0 < self.length_ratio_min <= self.length_ratio_max:
            raise ValueError(
                "pairs.length_ratio_min/length_ratio_max must satisfy 0 < min <= max, got "
                f"{self.length_ratio_min}, {self.length_ratio_max}"
            )
        if self.max_reuse <= 0:
            raise ValueError(f"pairs.max_reuse must be > 0, got {self.max_reuse}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"pairs.prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if not self.eval_ids and self.eval_problems is None and not self.allow_no_eval_set:
            raise ValueError(
                "pairs.eval_ids / pairs.eval_problems: no eval set named, so the leakage guard has nothing to check "
                "against; name the problems the adapter will be evaluated on (e.g. pairs.eval_problems=humaneval "
                "pairs.eval_fraction=0.5), or set pairs.allow_no_eval_set=true (the report will say so first)"
            )
        if self.eval_fraction is not None:
            if self.eval_problems is None:
                raise ValueError(f"pairs.eval_fraction={self.eval_fraction} needs pairs.eval_problems (the set split)")
            if not 0.0 < self.eval_fraction < 1.0:
                raise ValueError(f"pairs.eval_fraction must be in (0, 1), got {self.eval_fraction}")

    @property
    def rejectable(self) -> list[str]:
        return rejectable_outcomes(self.exclude_outcomes)

    @property
    def categories(self) -> list[str]:
        return category_names(self.category_key, self.rejectable)
