"""gen's typed configs. Sampling and execution are sub-configs that eval reuses as they are (`eval.sampling`,
`eval.execution`), so the two stages can never drift apart in what a sample means or how it is judged.

    gen:
      n: 64
      policy: adaptive   # n is then a budget per problem (gen.policy)
      sampling: {temperature: 0.8, top_p: 0.95, max_tokens: 512}
      execution: {executor: local, cpu_timeout_s: 5, time_limit: reference, time_floor_s: 1, time_factor: 4}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from gen.policy import POLICIES, AdaptivePolicy, earliest_stop
from sandbox import Limits, Outcome
from tasks.problems import SPLITS

EXECUTORS = ("local", "ray")
PROMPT_STYLES = ("auto", "chat", "base")
TIME_LIMITS = ("fixed", "reference")


@dataclass(frozen=True)
class SamplingConfig:
    """What the engine is asked for; every field changes the completions, so all of it is in a run's identity."""

    max_tokens: int = 512  # HumanEval solutions are < 300 tokens; longer is rambling
    temperature: float = 0.8  # diversity for oversampling; eval uses its own (lower) default
    top_p: float = 0.95
    prompt_style: str = "auto"  # chat | base | auto (chat if the tokenizer has a chat template)
    # Chat style only: the assistant turn is pre-filled with an opening fence and generation stops at the closing
    # one, so completions are code only: ~2-3x fewer tokens than code + explanation, and no prose to parse.
    response_prefix: str = "```python\n"
    logprobs: bool = True  # record the cumulative logprob of each completion
    ignore_eos: bool = False  # benchmarks only: force max_tokens per completion

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"sampling.max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"sampling.temperature must be in [0, 2] (vLLM's range), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"sampling.prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")


@dataclass(frozen=True)
class ExecutionConfig:
    """How completions are judged. The limits are in a run's identity: they change outcomes (TIMEOUT, MEMORY)."""

    execute: bool = True  # False: record completions only (outcome INFRA_ERROR "not executed"); benchmarks
    # local: a sandbox on the driver's machine (a cluster's head node); ray: each unit's execution is a Ray task
    # asking for 1 CPU, run wherever the cluster has one (a HumanEval unit of 4 x 64 samples is ~3 s of one core).
    executor: str = "local"
    workers: int = 0  # executor=local: sandbox workers (0 = all cores); ray: 1 per task
    cpu_timeout_s: float = 5.0  # CPU-seconds per execution (primary timeout; load can't cause a false TIMEOUT)
    # reference: a problem with a reference solution gets max(time_floor_s, time_factor x its reference's CPU time),
    # at most cpu_timeout_s (sandbox/time_limits.py; measured once per problem set, cached under $PAIRLOOP_CACHE);
    # the rest keep cpu_timeout_s. fixed: every job gets cpu_timeout_s. HumanEval references cost 2-142 CPU-ms here,
    # so the floor decides: an infinite loop costs 1 CPU-s instead of 5.
    time_limit: str = "reference"
    time_floor_s: float = 1.0  # evalplus uses 4 s of wall clock over 700+ tests per task; ours is CPU time
    time_factor: float = 4.0  # evalplus's default factor over the ground truth's time
    wall_timeout_s: float = 0.0  # wall-clock backstop for jobs that sleep; 0 = max(30 s, 4 x cpu_timeout_s)
    memory_mb: int = Limits.memory_mb  # address-space limit per job process
    max_attempts: int = 3  # a unit whose execution fails this often (our fault, not the model's) is reported
    # Run even where the sandbox gets less than full isolation (no root, no user namespaces): a job may then reach
    # the harness or the host. Off: such a machine is refused. On: manifests and reports say so in their first lines.
    allow_weak_isolation: bool = False

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"execution.executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.workers < 0:
            raise ValueError(f"execution.workers must be >= 0 (0 = all cores), got {self.workers}")
        if self.cpu_timeout_s <= 0:
            raise ValueError(f"execution.cpu_timeout_s must be > 0, got {self.cpu_timeout_s}")
        if self.wall_timeout_s < 0:
            raise ValueError(f"execution.wall_timeout_s must be >= 0 (0 = derived), got {self.wall_timeout_s}")
        if self.max_attempts <= 0:
            raise ValueError(f"execution.max_attempts must be > 0, got {self.max_attempts}")
        if self.time_limit not in TIME_LIMITS:
            raise ValueError(f"execution.time_limit must be one of {TIME_LIMITS}, got {self.time_limit!r}")
        if not self.time_factor > 1:
            raise ValueError(f"execution.time_factor must be > 1 (a limit below the reference's own time fails "
                             f"it), got {self.time_factor}")
        if not self.time_floor_s > 0:
            raise ValueError(f"execution.time_floor_s must be > 0, got {self.time_floor_s}")
        if self.time_limit == "reference" and self.time_floor_s > self.cpu_timeout_s:
            raise ValueError(f"execution.time_floor_s ({self.time_floor_s}) must be <= execution.cpu_timeout_s "
                             f"({self.cpu_timeout_s}) with time_limit=reference (the floor would raise every "
                             "limit to the fixed one); lower it or set execution.time_limit=fixed")
        self.limits()  # memory_mb and the timeouts are checked by the sandbox's own rules, named here

    def limits(self) -> Limits:
        wall = self.wall_timeout_s or max(30.0, 4 * self.cpu_timeout_s)
        try:
            return Limits(cpu_s=self.cpu_timeout_s, wall_s=wall, memory_mb=self.memory_mb)
        except ValueError as e:
            raise ValueError(f"execution: {e}") from None


@dataclass(frozen=True)
class GenConfig:
    out: str = "runs/gen"  # run folder: local path or pyarrow URI (s3://...); holds exactly one run
    problems: str = "humaneval"  # humaneval | mbpp | path/to/problems.jsonl
    split: str = "all"  # all | train | eval (deterministic hash split, see tasks.problems.split_problems)
    eval_fraction: float = 0.5  # share of problems in the eval split
    split_seed: int = 0
    limit: int = 0  # first N problems of the split (0 = all); for quick runs
    n: int = 64  # samples per problem (adaptive: at most); a problem yields pairs only with >=1 pass and >=1 fail
    # uniform: every problem gets n samples. adaptive (gen.policy): n is a budget per problem, spent in rounds on
    # the problems that can still yield pairs; a problem stops once a one-sided binomial test at stop_confidence
    # puts its pass rate outside [pass_rate_min, pass_rate_max]. An all-pass (all-fail) problem then stops after
    # ceil(log(1 - c) / log(0.95)) samples: c=0.2 -> 5, 0.5 -> 14, 0.8 -> 32 (rounded up to a round).
    policy: str = "uniform"
    first_round: int = 8  # adaptive: samples every problem gets before any decision
    round_size: int = 8  # adaptive: samples per later round (the last is capped at n); also the unit's sample block
    # adaptive: the pairs window (pairs.pass_rate_min/max; `pairloop run` sets these from the pairs section)
    pass_rate_min: float = 0.05
    pass_rate_max: float = 0.95
    stop_confidence: float = 0.5  # adaptive: c of the stopping test; lower stops unanimous problems sooner
    # adaptive: k > 0 also stops a problem in the window once it holds k distinct passing and k distinct failing
    # texts a pair may reject: up to k x pairs.max_reuse pairs from it (gen.policy). 0 = off
    enough_per_side: int = 0
    enough_exclude: list[str] = field(default_factory=lambda: ["NO_CODE"])  # pairs.exclude_outcomes (the loop's)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    seed: int = 0  # run seed; every sample's seed derives from (seed, problem, sample index)
    problems_per_unit: int = 4  # a unit is this many problems x samples_per_unit samples
    samples_per_unit: int = 0  # 0 = n (one block); smaller blocks rebalance faster on big n
    inflight_per_engine: int = 2  # units queued per engine so it never idles between units
    max_unit_attempts: int = 3  # a unit whose engine dies this often is reported, not retried forever
    adapter: str = ""  # optional LoRA folder to sample from (rows record it)
    adapter_name: str = ""  # label recorded in rows' adapter column (default: the folder path)
    run_id: str = ""  # default: derived from the run's identity
    ray_address: str = ""  # "" = $RAY_ADDRESS or a local Ray
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"gen.n must be > 0, got {self.n}")
        if self.policy not in POLICIES:
            raise ValueError(f"gen.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.first_round <= 0:
            raise ValueError(f"gen.first_round must be > 0, got {self.first_round}")
        if self.round_size <= 0:
            raise ValueError(f"gen.round_size must be > 0, got {self.round_size}")
        if not 0.0 < self.stop_confidence < 1.0:
            raise ValueError(f"gen.stop_confidence must be in (0, 1), got {self.stop_confidence}")
        if not 0.0 <= self.pass_rate_min <= self.pass_rate_max <= 1.0:
            raise ValueError("gen.pass_rate_min/pass_rate_max must satisfy 0 <= min <= max <= 1, got "
                             f"{self.pass_rate_min}, {self.pass_rate_max}")
        if self.enough_per_side < 0:
            raise ValueError(f"gen.enough_per_side must be >= 0 (0 = off), got {self.enough_per_side}")
        unknown = sorted(set(self.enough_exclude) - {o.name for o in Outcome})
        if unknown:
            raise ValueError(f"gen.enough_exclude: unknown outcome(s) {unknown}; known: {[o.name for o in Outcome]}")
        if self.enough_per_side and self.policy != "adaptive":
            raise ValueError(f"gen.enough_per_side={self.enough_per_side} needs gen.policy=adaptive (uniform draws "
                             "every problem's whole budget)")
        if self.policy == "adaptive":
            if self.first_round > self.n:
                raise ValueError(f"gen.first_round={self.first_round} is above the budget gen.n={self.n}")
            if self.round_size > self.n:
                raise ValueError(f"gen.round_size={self.round_size} is above the budget gen.n={self.n}")
            if self.samples_per_unit:
                raise ValueError(f"gen.samples_per_unit={self.samples_per_unit} is for policy=uniform; with "
                                 "policy=adaptive a unit's samples are a round (gen.first_round, gen.round_size)")
            if earliest_stop(AdaptivePolicy.of(self)) is None:
                warnings.warn(
                    f"gen.policy=adaptive can stop no problem before its budget here (gen.n={self.n}, "
                    f"first_round={self.first_round}, round_size={self.round_size}, stop_confidence="
                    f"{self.stop_confidence}, window [{self.pass_rate_min}, {self.pass_rate_max}]): even a unanimous "
                    "problem gets all gen.n samples, as under uniform; lower gen.stop_confidence or raise gen.n",
                    RuntimeWarning, stacklevel=3)
        if self.split not in SPLITS:
            raise ValueError(f"gen.split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"gen.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.limit < 0:
            raise ValueError(f"gen.limit must be >= 0, got {self.limit}")
        if self.problems_per_unit <= 0:
            raise ValueError(f"gen.problems_per_unit must be > 0, got {self.problems_per_unit}")
        if self.samples_per_unit < 0:
            raise ValueError(f"gen.samples_per_unit must be >= 0, got {self.samples_per_unit}")
        if self.inflight_per_engine <= 0:
            raise ValueError(f"gen.inflight_per_engine must be > 0, got {self.inflight_per_engine}")
        if self.max_unit_attempts <= 0:
            raise ValueError(f"gen.max_unit_attempts must be > 0, got {self.max_unit_attempts}")
        if not self.out:
            raise ValueError("gen.out must name an output folder")
        from gen.shards import check_output_path

        check_output_path("gen.out", self.out)
        if not isinstance(self.sampling, SamplingConfig) or not isinstance(self.execution, ExecutionConfig):
            raise ValueError(f"gen.sampling/gen.execution must be SamplingConfig/ExecutionConfig, got "
                             f"{type(self.sampling).__name__}/{type(self.execution).__name__}")
        if self.policy == "adaptive" and not self.execution.execute:
            raise ValueError("gen.policy=adaptive decides on outcomes: it needs gen.execution.execute=true")
