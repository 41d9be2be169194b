"""How gen spends `gen.n`, a budget of samples per problem (`gen.policy`).

    uniform   every problem gets all n samples: one plan, fixed before any sample exists (gen.plan.make_plan).
    adaptive  every problem gets a first round of `gen.first_round` samples; each time a problem's round is
              recorded, it gets another round of `gen.round_size` (the last one capped at n) unless its samples so
              far show it cannot yield pairs in the window [pass_rate_min, pass_rate_max] (the pairs stage's).

The stopping rule. A problem with s passes of m scored samples (PASS / non-INFRA_ERROR rows, the pass rate pairs
uses) stops when its budget is spent, or when a one-sided binomial test at confidence c rejects the window:

    too easy  P(X >= s | m, pass_rate_max) < 1 - c   (the one-sided Clopper-Pearson lower bound on its pass rate at
                                                        confidence c lies above the window)
    too hard  P(X <= s | m, pass_rate_min) < 1 - c   (the upper bound lies below it)

So an all-pass problem stops once pass_rate_max**m < 1 - c, i.e. after ceil(log(1 - c) / log(pass_rate_max))
samples (rounded up to a round boundary); with the window 0.05..0.95:

    c = 0.2: 5   c = 0.5: 14   c = 0.8: 32   c = 0.9: 45   (all-fail: the same, by symmetry)

A problem that has both passes and fails keeps sampling to its budget unless the test puts it outside the window
(e.g. 1 fail in 60), or, with `gen.enough_per_side` = k > 0, until its pass rate is inside the window and it holds
k distinct passing texts and k distinct failing ones a pair may reject ("enough"; failures whose outcome is in
`gen.enough_exclude`, which `pairloop run` sets from `pairs.exclude_outcomes`, do not count; texts are told apart
by tasks.text.coarse_key, which never counts more texts than pairs' dedup keeps, and a text seen with two
verdicts counts on neither side, as pairs drops it). k texts a side give the pairs stage up to k x
`pairs.max_reuse` pairs, so k = ceil(`pairs.max_pairs_per_problem` / max_reuse) can fill the problem's cap (2 for
the experiment's cap 4 at reuse 2), and k = the cap fills it with no text used twice, unless the length-ratio
bounds rule partners out (this does not model them). What stopping gives up is choice among rows (e.g. a rarer
failure category for a balanced selection). bench/pool_efficiency.py measures what the pairs stage itself selects
from each policy's pool, and replays k on a pool already drawn (--from-pool).

Small first rounds pay off only with a low c: a test on 4-8 samples cannot be sure of
anything, and what makes stopping early cheap in practice is that models' pass rates cluster at 0 and 1 (most
unanimous first rounds are truly unanimous problems). bench/pool_efficiency.py measures the trade on a real model
and replays other confidences on the same samples.

Not done: steering samples toward failure categories the pair quotas lack. The budget is per problem, so the
policy only decides whether a problem goes on; an order of problems would change nothing that is drawn. That would
need a budget shared across problems (a global decision), which this avoids on purpose.

Determinism. A problem's decisions depend only on its own samples, which their seeds fix (gen.plan): a resumed run
recomputes them from the shards it already holds and makes the same ones, and the samples a problem gets are a
function of its own outcomes in sample-index order (`replay`). Pure functions and plain classes: no Ray, no vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gen.plan import Unit, block_unit, problem_blocks, seed_bases
from tasks.text import coarse_key

POLICIES = ("uniform", "adaptive")
INFRA_ERROR = "INFRA_ERROR"  # sandbox.Outcome.INFRA_ERROR.value: our fault, no evidence about the problem
PASS = "PASS"
NO_CODE = "NO_CODE"  # no program to run: pairs.exclude_outcomes leaves it out of rejected rows by default


@dataclass(frozen=True)
class AdaptivePolicy:
    """The adaptive policy's settings (validated by gen.config.GenConfig, whose fields they are)."""

    budget: int  # gen.n
    first_round: int
    round_size: int
    pass_rate_min: float
    pass_rate_max: float
    confidence: float
    enough_per_side: int = 0  # > 0: a problem in the window with this many distinct passes and failures stops
    exclude: tuple[str, ...] = (NO_CODE,)  # failure outcomes that are no side for enough_per_side

    @classmethod
    def of(cls, cfg) -> "AdaptivePolicy":
        """From a gen.config.GenConfig with policy=adaptive."""
        return cls(cfg.n, cfg.first_round, cfg.round_size, cfg.pass_rate_min, cfg.pass_rate_max,
                   cfg.stop_confidence, cfg.enough_per_side, tuple(sorted(cfg.enough_exclude)))

    def identity(self) -> dict:
        """The settings that decide what is drawn (a run's identity); enough_per_side and exclude only when it is
        on, so runs made before it existed keep their identity."""
        d = dataclasses.asdict(self)
        if not self.enough_per_side:
            del d["enough_per_side"], d["exclude"]
        else:
            d["exclude"] = list(self.exclude)
        return d

    def round_size_after(self, drawn: int) -> int:
        """Size of the round that follows `drawn` samples (0: the budget is spent)."""
        return min(self.first_round if drawn == 0 else self.round_size, self.budget - drawn)


def binomial_tail(m: int, p: float, lo: int, hi: int) -> float:
    """P(lo <= X <= hi) for X ~ Binomial(m, p), summed in log space (no overflow at any m)."""
    lo, hi = max(lo, 0), min(hi, m)
    if lo > hi:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        k = 0 if p <= 0.0 else m  # all the mass sits on one k
        return 1.0 if lo <= k <= hi else 0.0
    lp, lq, lm = math.log(p), math.log1p(-p), math.lgamma(m + 1)
    return min(1.0, sum(math.exp(lm - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * lp + (m - k) * lq)
                        for k in range(lo, hi + 1)))


def stop_reason(policy: AdaptivePolicy, drawn: int, passes: int, scored: int, distinct_passes: int = 0,
                distinct_fails: int = 0) -> str | None:
    """Why a problem gets no more samples ("budget", "too_easy", "too_hard", "enough"), or None: another round.
    distinct_*: its distinct passing texts and distinct failing texts a pair may reject (enough_per_side only)."""
    if drawn >= policy.budget:
        return "budget"
    alpha = 1.0 - policy.confidence
    if scored and binomial_tail(scored, policy.pass_rate_max, passes, scored) < alpha:
        return "too_easy"
    if scored and binomial_tail(scored, policy.pass_rate_min, 0, passes) < alpha:
        return "too_hard"
    k = policy.enough_per_side
    if k and distinct_passes >= k and distinct_fails >= k \
            and policy.pass_rate_min <= passes / scored <= policy.pass_rate_max:  # pairs' window: its rate
        return "enough"
    return None


def earliest_stop(policy: AdaptivePolicy) -> int | None:
    """Samples after which a unanimous problem (every sample PASS, or every one failing) stops, the sooner of the
    two; None when neither stops before the budget: then adaptive spends on them what uniform would (the problems
    it exists to stop: enough_per_side stops only mixed ones)."""
    stops = [m for m in (replay(policy, [o] * policy.budget) for o in ("PASS", "ASSERTION_FAIL")) if m < policy.budget]
    return min(stops) if stops else None


def replay(policy: AdaptivePolicy, outcomes: Sequence[str], keys: Sequence[bytes] | None = None) -> int:
    """How many samples adaptive draws for a problem whose samples, in index order, have these outcomes (a uniform
    run's rows of it: a sample is the same completion whichever policy asked for it) and text keys (text_key;
    default: every text distinct). At most len(outcomes)."""
    t = Tally()
    while t.drawn < len(outcomes) and (t.drawn == 0 or t.stop_reason(policy) is None):
        size = min(policy.round_size_after(t.drawn), len(outcomes) - t.drawn)
        for i in range(t.drawn, t.drawn + size):
            t.count(outcomes[i], keys[i] if keys is not None else i.to_bytes(8, "big"), policy)
        t.drawn += size
    return t.drawn


def text_key(completion: str) -> bytes:
    """What tells two completions apart for enough_per_side: a hash of tasks.text.coarse_key (8 bytes a row)."""
    return hashlib.blake2b(coarse_key(completion), digest_size=8).digest()


@dataclass
class Tally:
    drawn: int = 0  # samples recorded: indices 0..drawn-1
    passes: int = 0
    scored: int = 0  # non-INFRA_ERROR
    verdicts: dict[bytes, set[str]] = field(default_factory=dict)  # enough_per_side: text key -> outcomes seen

    def count(self, outcome: str, key: bytes, policy: AdaptivePolicy) -> None:
        self.scored += outcome != INFRA_ERROR
        self.passes += outcome == PASS
        if policy.enough_per_side and outcome != INFRA_ERROR:
            self.verdicts.setdefault(key, set()).add(outcome)

    def stop_reason(self, policy: AdaptivePolicy) -> str | None:
        dp = df = 0
        if policy.enough_per_side:
            for seen in self.verdicts.values():
                if len(seen) == 1:  # a text seen with two verdicts is dropped by pairs' dedup: no side
                    (o,) = seen
                    dp += o == PASS
                    df += o != PASS and o not in policy.exclude
        return stop_reason(policy, self.drawn, self.passes, self.scored, dp, df)


class AdaptivePlan:
    """One adaptive run's plan: each problem's tally and each problem block's next round.

    Units keep the uniform plan's names: block `pb`'s round that starts at sample `s` is unit p{pb}-s{s}, and holds
    the block's problems still going. Going problems advance together, so a block's next round starts at the most
    samples any of its problems has; a problem that stopped has fewer and stays stopped (its tally no longer moves).
    """

    def __init__(self, policy: AdaptivePolicy, problem_ids: list[str], problems_per_unit: int, run_seed: int) -> None:
        self.policy = policy
        self.bases = seed_bases(problem_ids, policy.budget, run_seed)
        self.blocks = problem_blocks(problem_ids, problems_per_unit)
        self.block_of = {pid: b for b, (_, block) in enumerate(self.blocks) for pid in block}
        self.tally = {pid: Tally() for pid in problem_ids}

    def observe(self, problem_ids: Iterable[str], sample_indices: Iterable[int], outcomes: Iterable[str],
                completions: Iterable[str] | None = None) -> None:
        """Count recorded rows (a unit's, or every shard of a resumed run); completions are needed (and read) only
        with enough_per_side."""
        on = bool(self.policy.enough_per_side)
        if on and completions is None:
            raise ValueError("gen.enough_per_side needs each row's completion to tell texts apart")
        texts = completions if on else iter(lambda: "", None)
        for pid, i, o, text in zip(problem_ids, sample_indices, outcomes, texts, strict=on):
            t = self.tally[pid]
            t.drawn = max(t.drawn, i + 1)
            t.count(o, text_key(text) if on else b"", self.policy)

    def stop_reason(self, pid: str) -> str | None:
        t = self.tally[pid]
        return None if t.drawn == 0 else t.stop_reason(self.policy)

    def next_unit(self, block: int) -> Unit | None:
        """The block's next round, or None: every problem of it has stopped."""
        pb, pids = self.blocks[block]
        start = max(self.tally[p].drawn for p in pids)
        going = [p for p in pids if self.stop_reason(p) is None]
        if not going:
            return None
        behind = {p: self.tally[p].drawn for p in going if self.tally[p].drawn != start}
        if behind:  # our bug, never the model's: a round's problems all have the same samples so far
            raise RuntimeError(f"block p{pb:06d}: going problems must have {start} samples each, got {behind}")
        return block_unit(pb, going, start, self.policy.round_size_after(start), self.bases)

    def open_units(self) -> list[Unit]:
        """The next round of every block that has one (all first rounds, before anything is recorded)."""
        return [u for b in range(len(self.blocks)) if (u := self.next_unit(b)) is not None]

    def block_of_unit(self, unit: Unit) -> int:
        return self.block_of[unit.requests[0].problem_id]

    def planned_samples(self) -> int:
        """Samples the run will have drawn when done, as far as known now (a going problem counts its budget)."""
        return sum(t.drawn if self.stop_reason(p) is not None else self.policy.budget for p, t in self.tally.items())

    def samples_per_problem(self) -> dict[str, int]:
        return {p: t.drawn for p, t in self.tally.items()}

    def stopped(self) -> dict[str, str]:
        """problem id -> why it got no more samples, for every problem that stopped."""
        return {p: r for p in self.tally if (r := self.stop_reason(p)) is not None}
