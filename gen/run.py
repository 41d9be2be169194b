"""Oversample completions with a pool of vLLM engines, execute each one, write resumable Parquet shards.

    python -m gen --config configs/demo.yaml gen.n=32
    pairloop gen --config configs/demo.yaml gen.out=runs/demo/gen

The driver plans work units (a block of problems x a block of sample indices), hands each to whichever engine is
free (two in flight per engine, so an engine never waits for the driver), executes finished units in the sandbox
while the engines generate the next ones (gen.executor=local: sandbox workers on this machine fed by a background
thread; ray: one 1-CPU Ray task per unit, anywhere in the cluster), and writes each unit's shard atomically before
recording it in the manifest. A rerun skips complete units; a dead engine's unit (a lost node's too) is requeued.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from gen.engine import EngineConfig, EnginePool, ensure_ray, planned_use_gpu, resolve_dtype
from gen.plan import Unit, make_plan
from gen.config import ExecutionConfig, GenConfig, SamplingConfig
from gen.policy import AdaptivePlan, AdaptivePolicy
from gen.shards import ShardStore, rows_to_table


@dataclass
class GenResult:
    out: str
    run_id: str
    rows: int
    complete: bool
    failed_units: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    requeued: int = 0  # units sent back to the queue in this call (engine or node died, task failed)


def select_problems(cfg: GenConfig):
    from tasks.problems import select_problems as select

    return select(cfg.problems, cfg.split, cfg.eval_fraction, cfg.split_seed, cfg.limit)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    """Loaded once per process: eval renders the same prompts for every (variant, seed) run (~1 s a load)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class _Renderer:
    """Prompt text and per-request token budget for each problem, from the model's tokenizer."""

    def __init__(self, model_path: str, style: str, max_model_len: int, response_prefix: str = "") -> None:
        self.tok = _tokenizer(model_path)
        if style == "auto":
            style = "chat" if getattr(self.tok, "chat_template", None) else "base"
        self.style = style
        self.max_model_len = max_model_len
        self.response_prefix = response_prefix if style == "chat" else ""
        # the closing fence ends the answer when the opening one was pre-filled
        self.stop = ["```"] if self.response_prefix.startswith("```") else []

    def prompt(self, problem) -> str:
        from tasks.prompts import build_prompt

        return build_prompt(problem, self.style, tokenizer=self.tok) + self.response_prefix

    def budget(self, prompt: str, max_tokens: int, problem_id: str) -> int:
        n_prompt = len(self.tok(prompt, add_special_tokens=False)["input_ids"])
        room = self.max_model_len - n_prompt
        if room <= 0:
            raise ValueError(
                f"problem {problem_id}: prompt has {n_prompt} tokens, engine.max_model_len={self.max_model_len}"
            )
        return min(max_tokens, room)


def _execute_unit(sandbox, problems, style, unit: Unit, outputs: list[list[dict]], ctx: dict) -> list[dict]:
    """Label every completion of a unit; returns shard rows. Runs on the executor thread."""
    from tasks.prompts import extract_program
    from sandbox import Job, Outcome, label

    rows, jobs, job_rows, programs = [], [], [], []
    for req, comps in zip(unit.requests, outputs, strict=True):
        if len(comps) != req.size:
            raise RuntimeError(f"unit {unit.unit_id}: {req.problem_id} got {len(comps)} completions of {req.size}")
        problem = problems[req.problem_id]
        for k, c in enumerate(comps):
            row = {
                "run_id": ctx["run_id"], "unit_id": unit.unit_id, "problem_id": req.problem_id,
                "sample_index": req.start + k, "run_seed": ctx["seed"], "seed": req.seed + k,
                "model": ctx["model"], "adapter": ctx["adapter"], "prompt": ctx["prompts"][req.problem_id],
                "completion": c["text"], "completion_tokens": c["tokens"], "finish_reason": c["finish_reason"],
                "cumulative_logprob": c["cumulative_logprob"], "outcome": None, "phase": None,
                "error_type": None, "error_message": None, "exec_time_s": 0.0,
            }
            rows.append(row)
            if sandbox is None:
                row.update(outcome=Outcome.INFRA_ERROR.value, error_message="not executed (gen.execute=false)")
                continue
            program = extract_program(problem, c["text"], style)
            if program is None:
                row.update(outcome=Outcome.NO_CODE.value)
                continue
            programs.append(program)
            jobs.append(Job(program=program, test=problem.test, entry_point=problem.entry_point, prompt=problem.prompt,
                            cpu_s=ctx["cpu_limits"].get(req.problem_id)))
            job_rows.append(row)
    if jobs:
        for row, program, res in zip(job_rows, programs, sandbox.run(jobs), strict=True):
            phase = res.phase.value if res.phase is not None else None
            row.update(
                outcome=label(res.outcome.value, row["finish_reason"], phase, program),
                phase=phase,
                error_type=res.error_type,
                error_message=res.error_message,
                exec_time_s=float(res.exec_time_s),
            )
    return rows


_WORKER_SANDBOXES: dict[tuple, Any] = {}  # executor=ray: one warm sandbox per Ray worker process and limits


def isolation_record(box) -> dict[str, Any]:
    """What a sandbox got on its machine, as recorded in manifests (JSON-ready, `complete` included)."""
    import socket

    return {**dataclasses.asdict(box.isolation), "complete": bool(box.isolation.complete),
            "host": socket.gethostname()}


def check_isolation(record: dict[str, Any], allow_weak: bool) -> None:
    if not record["complete"] and not allow_weak:
        missing = list(record.get("missing") or [k for k, v in record.items() if v is False])
        raise ValueError(
            f"sandbox isolation is incomplete on {record['host']} (missing: {', '.join(missing) or record}); a job "
            "could reach the harness or the host. Run as root or where user namespaces work, or set "
            "execution.allow_weak_isolation=true (manifests and reports then say so first)")


def execute_unit_task(problems, style, unit: Unit, outputs: list[list[dict]], ctx: dict,
                      limits: dict[str, Any], allow_weak: bool) -> dict[str, Any]:
    """Body of the Ray task behind execution.executor=ray: label one unit's completions in this worker's sandbox.
    Refuses (raises) on a node whose sandbox lacks full isolation unless allowed."""
    key = tuple(sorted(limits.items()))
    box = _WORKER_SANDBOXES.get(key)
    if box is None:
        from sandbox import Limits, Sandbox

        box = _WORKER_SANDBOXES[key] = Sandbox(workers=1, limits=Limits(**limits))
    record = isolation_record(box)
    check_isolation(record, allow_weak)
    return {"rows": _execute_unit(box, problems, style, unit, outputs, ctx), "isolation": record}


def pool_value(problem_ids: Sequence[str], outcomes: Sequence[str], tokens: Sequence[int],
               window: tuple[float, float] = (0.05, 0.95), cap: int = 0) -> dict[str, Any]:
    """What a pool of samples (one row per entry) is worth for pairs:

    usable problems: >=1 pass, >=1 fail, pass rate (PASS / non-INFRA rows) in `window` (pairs' window);
    usable pairs: the sum over usable problems of min(passes, fails), the pairs that use no completion twice (an
      upper bound on what pairs.max_reuse=1 selects, before pairs' exclusions, length bounds and dedup), and at
      most `cap` per problem when cap > 0 (pairs.max_pairs_per_problem);
    tokens per usable pair: every generated token (usable problems' or not) over usable pairs."""
    per = collections.defaultdict(lambda: [0, 0])
    for pid, o in zip(problem_ids, outcomes, strict=True):
        if o != "INFRA_ERROR":
            per[pid][0 if o == "PASS" else 1] += 1
    lo, hi = window
    usable = [(p, f) for p, f in per.values() if p and f and lo <= p / (p + f) <= hi]
    pairs = sum(min(p, f, cap) if cap > 0 else min(p, f) for p, f in usable)
    total = int(sum(tokens))
    return {
        "problems_pass_and_fail": sum(1 for p, f in per.values() if p and f),
        "pass_rate_window": [lo, hi],
        "usable_problems": len(usable),
        "usable_pairs": pairs,
        "generated_tokens": total,
        "tokens_per_usable_pair": total / pairs if pairs else None,
    }


def summarize(store: ShardStore, window: tuple[float, float] = (0.05, 0.95), cap: int = 0) -> dict[str, Any]:
    """Rows, pass rate, outcome counts, samples per problem, and what the pool is worth for pairs (pool_value;
    with cap > 0, gen.enough_per_side's, also its usable pairs at most cap per problem: what such a pool is for)."""
    t = store.read_table(columns=["problem_id", "outcome", "completion_tokens"])
    outcomes = t.column("outcome").to_pylist()
    pids = t.column("problem_id").to_pylist()
    counts = collections.Counter(outcomes)
    scored = sum(v for k, v in counts.items() if k != "INFRA_ERROR")
    tokens = t.column("completion_tokens").to_pylist()
    capped = ({"pairs_cap": cap, "usable_pairs_at_cap": pool_value(pids, outcomes, tokens, window, cap)["usable_pairs"]}
              if cap > 0 else {})
    return {
        "rows": len(outcomes),
        "pass_rate": counts.get("PASS", 0) / scored if scored else None,
        "outcomes": dict(sorted(counts.items())),
        "infra_errors": counts.get("INFRA_ERROR", 0),
        "problems": len(set(pids)),
        "samples_per_problem": dict(sorted(collections.Counter(pids).items())),
        **pool_value(pids, outcomes, tokens, window), **capped,
    }


@dataclass
class RunSpec:
    """Everything a run needs before any engine work: problems, prompts, budgets, its identity and its plan."""

    problems: dict[str, Any]  # problem id -> tasks.problems.Problem
    style: str  # the prompt style the renderer chose (auto resolved)
    prompts: dict[str, str]
    budgets: dict[str, int]  # problem id -> max new tokens (max_tokens, capped by what the context leaves)
    stop: list[str]
    identity: dict[str, Any]
    run_id: str
    units: list[Unit]  # uniform: the whole plan; adaptive: the first rounds (later ones follow from outcomes)
    adapter_label: str | None
    adaptive: AdaptivePolicy | None = None
    time_limits: dict[str, Any] | None = None  # execution.time_limit=reference: problem_time_limits' record


def problem_time_limits(ex: ExecutionConfig, problems: Sequence[Any]) -> dict[str, Any] | None:
    """execution.time_limit=reference: each problem's CPU limit (sandbox/time_limits.py), from the measurement of
    its problem set's references cached at $PAIRLOOP_CACHE/reference-cpu/<key>.json (measured on a miss: 5 jobs per
    reference, a few seconds for HumanEval). fixed (or execute=false): None. The record goes into manifests:
    {mode, floor_s, factor, cap_s, measurement (the cache key), cpu_model, limits_sha256, limits, kept_fixed}."""
    if ex.time_limit == "fixed" or not ex.execute:
        return None
    from gen.model_source import cache_root
    from gen.shards import write_bytes_atomic
    from sandbox import Job
    from sandbox.time_limits import FORMAT, derive_limits, limits_digest, measure_references, measurement_key
    from tasks.problems import problem_set_fingerprint

    limits = ex.limits()
    key = measurement_key(problem_set_fingerprint(problems, with_reference=True), limits)
    path = cache_root() / "reference-cpu" / f"{key}.json"
    measured = None
    if path.is_file():
        try:
            measured = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"pairloop: unreadable reference-time cache {str(path)!r} ({e}); measuring again", file=sys.stderr)
        if measured is not None and (measured.get("key") != key or measured.get("format") != FORMAT):
            print(f"pairloop: reference-time cache {str(path)!r} is not for this key; measuring again", file=sys.stderr)
            measured = None
    if measured is None:
        t0 = time.perf_counter()
        jobs = {p.id: None if p.reference is None else Job(p.reference, p.test, p.entry_point, p.prompt)
                for p in problems}
        measured = {**measure_references(jobs, limits, workers=ex.workers or None), "key": key}
        try:
            write_bytes_atomic(str(path), json.dumps(measured, sort_keys=True).encode())
        except OSError as e:  # a cache we can't write costs a measurement next time, nothing else
            print(f"pairloop: could not cache the reference times at {str(path)!r}: {e}", file=sys.stderr)
        print(f"pairloop: measured {sum(j is not None for j in jobs.values())} reference solutions x "
              f"{measured['repeats']} in {time.perf_counter() - t0:.1f} s (cached at {path})", file=sys.stderr)
        for pid, e in measured["references"].items():
            if "outcome" in e:
                print(f"pairloop: {pid}: {e['kept']}; it keeps cpu_timeout_s={ex.cpu_timeout_s:g}", file=sys.stderr)
    cpu_limits, kept = derive_limits(measured, [p.id for p in problems], ex.time_floor_s, ex.time_factor,
                                     limits.cpu_s)
    return {"mode": ex.time_limit, "floor_s": ex.time_floor_s, "factor": ex.time_factor, "cap_s": limits.cpu_s,
            "measurement": key, "cpu_model": measured["cpu_model"], "limits_sha256": limits_digest(cpu_limits),
            "limits": cpu_limits, "kept_fixed": kept}


def run_identity(cfg: GenConfig, engine_cfg: EngineConfig, model: dict[str, Any], problem_set: str,
                 style: str, response_prefix: str, samples_per_unit: int, adapter_label: str | None,
                 serving: dict[str, Any] | None = None, dtype: str | None = None,
                 time_limits: dict[str, Any] | None = None, lora_ops: str | None = None,
                 top_p: str | None = None) -> dict[str, Any]:
    """Every setting that changes a row: two runs with equal identities are the same run (resume), else not."""
    asdict = dataclasses.asdict
    return {
        "model": model["name"], "model_fingerprint": model["fingerprint"], "adapter": adapter_label,
        "problems": cfg.problems, "problem_set": problem_set, "split": cfg.split,
        "eval_fraction": cfg.eval_fraction, "split_seed": cfg.split_seed, "limit": cfg.limit, "n": cfg.n,
        "sampling": asdict(cfg.sampling),
        "prompt_style": style, "response_prefix": response_prefix,  # as resolved; pairs reads these two
        "seed": cfg.seed, "problems_per_unit": cfg.problems_per_unit, "samples_per_unit": samples_per_unit,
        # adaptive: which samples exist depends on these (uniform: absent, so its identity is as it always was)
        **({"policy": {"name": cfg.policy, **AdaptivePolicy.of(cfg).identity()}}
           if cfg.policy != "uniform" else {}),
        "execute": cfg.execution.execute,
        "sandbox_limits": asdict(cfg.execution.limits()) if cfg.execution.execute else None,
        # engine settings that change outputs: the context cap bounds every budget, dtype changes the numerics
        # (as resolved: `auto` is bfloat16 on one machine and float32 on another)
        "engine": {"max_model_len": engine_cfg.max_model_len, "dtype": dtype or engine_cfg.dtype,
                   "tensor_parallel_size": engine_cfg.tensor_parallel_size,
                   # a LoRA served through other ops than vLLM's own (CPU, gen/cpu_lora.py): other rounding
                   **({"lora_ops": lora_ops} if lora_ops not in (None, "vllm") else {}),
                   # top-p applied by gen/cpu_sampler.py (CPU): ties at the nucleus boundary are all kept
                   **({"top_p": top_p} if top_p not in (None, "vllm") and cfg.sampling.top_p < 1 else {})},
        **({"serving": serving} if serving else {}),  # eval: how the adapter was served (lora | merged)
        # per-problem CPU limits (execution.time_limit=reference): the limits themselves, not the measurement, so a
        # rerun on another machine whose measurement gives the same limits is the same run; fixed: absent
        **({"time_limits": {k: time_limits[k] for k in ("mode", "floor_s", "factor", "limits_sha256")}}
           if time_limits else {}),
    }


def prepare_run(cfg: GenConfig, engine_cfg: EngineConfig, model_path: str, lora: dict | None = None,
                serving: dict[str, Any] | None = None, use_gpu: bool | None = None) -> RunSpec:
    """Select problems, render prompts, fix budgets and identity, plan units. No engine, no Ray."""
    from gen.model_source import model_identity
    from tasks.problems import problem_set_fingerprint

    problems_list = select_problems(cfg)
    if cfg.adapter and not os.path.isdir(cfg.adapter):
        raise ValueError(f"gen.adapter: no such adapter folder {cfg.adapter!r}")
    adapter_label = cfg.adapter_name or (os.path.abspath(cfg.adapter) if cfg.adapter else None)
    if lora is not None and adapter_label is None:
        adapter_label = lora["path"]
    samples_per_unit = cfg.samples_per_unit or cfg.n
    renderer = _Renderer(model_path, cfg.sampling.prompt_style, engine_cfg.max_model_len,
                         cfg.sampling.response_prefix)
    from gen.cpu_lora import planned as planned_lora_ops
    from gen.cpu_sampler import planned as planned_top_p

    use_gpu = planned_use_gpu(engine_cfg) if use_gpu is None else use_gpu
    dtype, _ = resolve_dtype(engine_cfg, use_gpu)
    time_limits = problem_time_limits(cfg.execution, problems_list)
    served_lora = lora is not None or bool(cfg.adapter)  # a merged adapter is plain weights to the engine
    identity = run_identity(cfg, engine_cfg, model_identity(engine_cfg.model), problem_set_fingerprint(problems_list),
                            renderer.style, renderer.response_prefix, samples_per_unit, adapter_label, serving, dtype,
                            time_limits, planned_lora_ops(use_gpu) if served_lora else None, planned_top_p(use_gpu))
    prompts = {p.id: renderer.prompt(p) for p in problems_list}
    adaptive = AdaptivePolicy.of(cfg) if cfg.policy == "adaptive" else None
    if adaptive is None:
        units = make_plan(list(prompts), cfg.n, cfg.seed, cfg.problems_per_unit, samples_per_unit)
    else:
        units = AdaptivePlan(adaptive, list(prompts), cfg.problems_per_unit, cfg.seed).open_units()
    return RunSpec(
        problems={p.id: p for p in problems_list}, style=renderer.style, prompts=prompts,
        budgets={pid: renderer.budget(pr, cfg.sampling.max_tokens, pid) for pid, pr in prompts.items()},
        stop=renderer.stop, identity=identity, run_id=cfg.run_id or f"gen-{_digest(identity)[:12]}",
        units=units, adapter_label=adapter_label, adaptive=adaptive, time_limits=time_limits,
    )


def sampling_params(s: SamplingConfig, req, max_tokens: int, stop: list[str]) -> dict[str, Any]:
    """vLLM SamplingParams fields for one request of a unit (n children, seeds seed..seed+n-1)."""
    p = {"n": req.size, "temperature": s.temperature, "top_p": s.top_p, "seed": req.seed, "max_tokens": max_tokens,
         "ignore_eos": s.ignore_eos}
    if stop and not s.ignore_eos:
        p["stop"] = stop
    if s.logprobs:
        p["logprobs"] = 0
    return p


@dataclass
class _Run:
    """One run folder written by a call: its config, plan, store, manifest, execution context, open units."""

    cfg: GenConfig
    spec: RunSpec
    store: ShardStore
    manifest: Any  # gen.shards.Manifest
    ctx: dict
    todo: list[Unit]
    lora: dict | None = None  # the adapter this run samples from (None: the base model)
    failed: dict[str, str] = field(default_factory=dict)
    plan: AdaptivePlan | None = None  # policy=adaptive: tallies and next rounds, kept up to date by the driver

    def planned_samples(self) -> int:
        return self.plan.planned_samples() if self.plan else sum(u.num_samples for u in self.spec.units)

    def is_complete(self) -> bool:
        """No unit failed and nothing is left to sample (adaptive: no block has another round)."""
        if self.failed:
            return False
        if self.plan is not None:
            return not self.plan.open_units()
        return len(self.manifest.units) == len(self.spec.units)

    def call_sequences(self) -> int:
        """adaptive: rounds are small, so the driver packs several into one engine call, up to a uniform unit's
        size (problems_per_unit x n). 0: one unit per call."""
        return self.cfg.problems_per_unit * self.cfg.n if self.plan is not None else 0


def open_adaptive(run: _Run) -> None:
    """Rebuild an adaptive run's plan from the shards its manifest lists (resume) and set its open rounds."""
    run.plan = AdaptivePlan(run.spec.adaptive, list(run.spec.prompts), run.cfg.problems_per_unit, run.cfg.seed)
    texts = bool(run.spec.adaptive.enough_per_side)  # enough_per_side tells texts apart: read them too
    t = run.store.read_table(columns=["problem_id", "sample_index", "outcome", *(["completion"] if texts else [])])
    run.plan.observe(t.column("problem_id").to_pylist(), t.column("sample_index").to_pylist(),
                     t.column("outcome").to_pylist(), t.column("completion").to_pylist() if texts else None)
    run.todo = run.plan.open_units()
    done = [u.unit_id for u in run.todo if u.unit_id in run.manifest.units]
    if done:  # the shards and the manifest disagree: refuse to resume over them
        raise RuntimeError(f"{run.spec.run_id}: next rounds {done[:3]} are already recorded")


# What one engine call generates: (run index, unit) pairs. gen: one unit; eval: units of several seeds' runs.
Item = tuple[tuple[int, Unit], ...]


def pack_items(todo: Sequence[Sequence[Unit]], sequences_per_call: int,
               groups: Sequence[Any] | None = None) -> list[Item]:
    """Work items for one pass over several runs. 0: one unit per call (gen). Otherwise units are taken round-robin
    across runs (so seeds mix) and packed greedily into calls of at most `sequences_per_call` sequences (a unit
    larger than that goes alone). `groups` (one key per run): units of different groups never share a call (the
    adapter of each run, where the engine can't mix base and LoRA in a batch). Which call a sample lands in never
    changes it: its seed is data."""
    if sequences_per_call <= 0:
        return [((i, u),) for i, units in enumerate(todo) for u in units]
    groups = list(groups) if groups is not None else [0] * len(todo)
    items: list[Item] = []
    for g in dict.fromkeys(groups):  # in order of first appearance
        runs = [(i, t) for i, t in enumerate(todo) if groups[i] == g]
        order = [(i, t[k]) for k in range(max((len(t) for _, t in runs), default=0)) for i, t in runs if k < len(t)]
        current: list[tuple[int, Unit]] = []
        size = 0
        for part in order:
            n = part[1].num_samples
            if current and size + n > sequences_per_call:
                items.append(tuple(current))
                current, size = [], 0
            current.append(part)
            size += n
        if current:
            items.append(tuple(current))
    return items


class _Executor:
    """Labels finished units: on local sandbox workers fed by one background thread, or as 1-CPU Ray tasks.

    A failed execution (our infrastructure, never the model's) is retried up to `max_attempts` times, the same way
    for both kinds; after that the unit is reported as failed, not scored.
    """

    def __init__(self, ex: ExecutionConfig) -> None:
        import ray

        self.ex = ex
        self.remote = ex.execute and ex.executor == "ray"
        self.sandbox = None
        self.isolation: list[dict[str, Any]] = []  # distinct isolation records of the sandboxes that labelled rows
        if ex.execute and not self.remote:
            from sandbox import Sandbox

            self.sandbox = Sandbox(workers=ex.workers or None, limits=ex.limits())
            record = isolation_record(self.sandbox)
            try:
                check_isolation(record, ex.allow_weak_isolation)
            except ValueError:
                self.sandbox.close()
                raise
            self.isolation.append(record)
        self.thread = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairloop-exec")
        self.futs: dict[cf.Future, tuple[_Run, Unit, list]] = {}
        self.refs: dict[Any, tuple[_Run, Unit, list]] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.retried = 0
        self._task = ray.remote(execute_unit_task).options(num_cpus=1, max_retries=3)  # retries: lost node

    def warn_if_no_cpu(self) -> None:
        import ray

        if self.remote and ray.available_resources().get("CPU", 0) < 1:
            print(f"pairloop gen: execution.executor=ray but the cluster has no free CPU for execution tasks "
                  f"({ray.cluster_resources().get('CPU', 0):g} CPUs, engines hold some); they wait for one "
                  "(an autoscaler adds nodes; on one machine use execution.executor=local)", file=sys.stderr)

    def pending(self) -> bool:
        return bool(self.futs or self.refs)

    def submit(self, run: _Run, u: Unit, outputs: list) -> None:
        spec = run.spec
        if not self.remote:
            fut = self.thread.submit(_execute_unit, self.sandbox, spec.problems, spec.style, u, outputs, run.ctx)
            self.futs[fut] = (run, u, outputs)
            return
        pids = [r.problem_id for r in u.requests]
        uctx = dict(run.ctx, prompts={p: run.ctx["prompts"][p] for p in pids},
                    cpu_limits={p: run.ctx["cpu_limits"][p] for p in pids if p in run.ctx["cpu_limits"]})
        ref = self._task.remote({p: spec.problems[p] for p in pids}, spec.style, u, outputs, uctx,
                                dataclasses.asdict(self.ex.limits()), self.ex.allow_weak_isolation)
        self.refs[ref] = (run, u, outputs)

    def collect_local(self, record) -> None:
        """Record every finished local execution (or retry/fail it)."""
        for fut in [f for f in self.futs if f.done()]:
            run, u, outputs = self.futs.pop(fut)
            try:
                rows = fut.result()
            except Exception as e:  # a bug or a sandbox fault on our side: retried like a failed Ray task
                self._retry_or_fail(run, u, outputs, f"local execution failed: {type(e).__name__}: {e}")
                continue
            record(run, u, rows)

    def on_ref(self, ref, record) -> None:
        import ray

        run, u, outputs = self.refs.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as e:  # Ray's own retries (lost worker or node) are spent
            self._retry_or_fail(run, u, outputs, f"execution task failed: {type(e).__name__}: {str(e)[-300:]}")
            return
        if out["isolation"] not in self.isolation:
            self.isolation.append(out["isolation"])
        record(run, u, out["rows"])

    def _retry_or_fail(self, run: _Run, u: Unit, outputs: list, why: str) -> None:
        key = (run.spec.run_id, u.unit_id)
        self.attempts[key] += 1
        if self.attempts[key] >= self.ex.max_attempts:
            run.failed[u.unit_id] = f"{why} ({self.attempts[key]} attempts)"
        else:
            self.retried += 1
            self.submit(run, u, outputs)

    def wait_local(self, timeout: float) -> None:
        cf.wait(list(self.futs), timeout=timeout, return_when=cf.FIRST_COMPLETED)

    def close(self, wait: bool) -> None:
        import ray

        if not wait:
            for ref in self.refs:  # Ctrl-C: don't leave execution tasks running on the cluster
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
        self.thread.shutdown(wait=wait, cancel_futures=not wait)
        if self.sandbox is not None:
            self.sandbox.close()


class _Driver:
    """One call's event loop: keep every engine fed with work items, hand finished units to the executor, record
    rows in their run's folder, and bring dead engines back (Ray restarts the actor; past that, a bounded number of
    fresh actors)."""

    def __init__(self, runs: list[_Run], items: list[Item], engine_cfg: EngineConfig, pool: EnginePool,
                 progress_bar) -> None:
        self.runs, self.engine_cfg, self.pool, self.bar = runs, engine_cfg, pool, progress_bar
        self.todo: collections.deque[Item] = collections.deque(items)
        first = runs[0].cfg
        self.inflight_per_engine, self.max_attempts = first.inflight_per_engine, first.max_unit_attempts
        self.inflight: dict[Any, tuple[int, Item, int]] = {}  # ObjectRef -> (engine, item, engine epoch)
        self.epoch: collections.Counter = collections.Counter()  # bumps when an engine dies: one death counts once
        self.recovering: dict[Any, int] = {}  # health-probe ObjectRef -> engine, while a dead engine comes back
        self.replacements: collections.Counter = collections.Counter()
        self.disabled: set[int] = set()
        self.attempts: collections.Counter = collections.Counter()
        self.requeued = 0
        self.stats = {"tokens": 0, "pass": 0, "scored": 0, "t0": time.perf_counter()}
        self.executor: _Executor | None = None

    def load(self, i: int) -> int:
        return sum(1 for e, _, _ in self.inflight.values() if e == i)

    def dispatch(self) -> None:
        busy = set(self.recovering.values()) | self.disabled
        for i in range(len(self.pool)):
            while i not in busy and self.todo and self.load(i) < self.inflight_per_engine:
                item = self.take()
                prompts, params, loras = [], [], []
                for ri, u in item:
                    run = self.runs[ri]
                    for r in u.requests:
                        prompts.append(run.spec.prompts[r.problem_id])
                        params.append(sampling_params(run.cfg.sampling, r, run.spec.budgets[r.problem_id],
                                                      run.spec.stop))
                        loras.append(run.lora)
                if all(lr is loras[0] for lr in loras):
                    ref = self.pool.generate(i, prompts, params, loras[0])
                else:  # variants share the call: the engine keeps base and LoRA apart where it must
                    ref = self.pool.generate(i, prompts, params, loras=loras)
                self.inflight[ref] = (i, item, self.epoch[i])

    def take(self) -> Item:
        """The next work item; an adaptive run's rounds waiting behind it join it up to the run's call size."""
        item = self.todo.popleft()
        ri = item[0][0]
        cap = self.runs[ri].call_sequences() if all(r == ri for r, _ in item) else 0
        size = sum(u.num_samples for _, u in item)
        while cap and self.todo and all(r == ri for r, _ in self.todo[0]):
            more = sum(u.num_samples for _, u in self.todo[0])
            if size + more > cap:
                break
            item += self.todo.popleft()
            size += more
        return item

    def record(self, run: _Run, u: Unit, rows: list[dict]) -> None:
        run.store.write_unit(run.manifest, u.unit_id, rows_to_table(rows))
        if run.plan is not None:  # decide this block's next round now: no barrier across blocks
            run.plan.observe([r["problem_id"] for r in rows], [r["sample_index"] for r in rows],
                             [r["outcome"] for r in rows], [r["completion"] for r in rows])
            nxt = run.plan.next_unit(run.plan.block_of_unit(u))
            if nxt is not None:
                self.todo.append(((next(i for i, r in enumerate(self.runs) if r is run), nxt),))
            self.bar.total = sum(r.planned_samples() for r in self.runs)
        self.stats["pass"] += sum(r["outcome"] == "PASS" for r in rows)
        self.stats["scored"] += sum(r["outcome"] != "INFRA_ERROR" for r in rows)
        self.bar.update(len(rows))
        el = time.perf_counter() - self.stats["t0"]
        post = {"tok/s": f"{self.stats['tokens'] / el:.0f}"}
        if self.stats["scored"]:
            post["pass"] = f"{self.stats['pass'] / self.stats['scored']:.1%}"
        self.bar.set_postfix(post, refresh=False)

    def fail(self, item: Item, why: str) -> None:
        for ri, u in item:
            self.runs[ri].failed[u.unit_id] = why

    def probe(self, i: int) -> None:
        self.recovering[self.pool.actors[i].info.remote()] = i

    def on_probe(self, ref) -> None:
        import ray

        i = self.recovering.pop(ref)
        try:
            ray.get(ref)  # the engine is back (Ray restarted the actor and rebuilt its LLM)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.5)  # still restarting
            self.probe(i)
        except ray.exceptions.RayActorError:
            # Ray's restarts are used up: replace the actor with a fresh one, a bounded number of times
            self.replacements[i] += 1
            if self.replacements[i] > self.engine_cfg.max_restarts:
                self.disabled.add(i)
                print(f"pairloop gen: engine {i} keeps dying; disabled", file=sys.stderr)
                return
            from gen.engine import PlacementTimeout

            try:
                self.pool.replace_engine(i)
            except PlacementTimeout as e:  # no room for it anywhere: run on with the engines that are left
                self.disabled.add(i)
                print(f"pairloop gen: engine {i} could not be replaced ({e}); disabled", file=sys.stderr)
                return
            self.probe(i)

    def on_engine_death(self, i: int, item: Item, ep: int, e: Exception) -> None:
        if ep == self.epoch[i]:  # first report of this death; the engine's other in-flight items fail with it
            self.epoch[i] += 1
            self.attempts[item] += 1  # the item that was running when it died is the suspect
            self.probe(i)
        if self.attempts[item] >= self.max_attempts:
            self.fail(item, f"engine died {self.attempts[item]} times while running it: {type(e).__name__}")
        else:
            self.requeued += 1
            self.todo.appendleft(item)

    def on_engine_output(self, ref) -> None:
        import ray

        i, item, ep = self.inflight.pop(ref)
        try:
            outputs = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # died, or unavailable while restarting
            self.on_engine_death(i, item, ep, e)
            return
        except ray.exceptions.RayTaskError as e:
            self.attempts[item] += 1
            if self.attempts[item] >= self.max_attempts:
                self.fail(item, f"{type(e.cause).__name__ if e.cause else 'error'}: {str(e)[-300:]}")
            else:
                self.requeued += 1
                self.todo.append(item)
            return
        self.stats["tokens"] += sum(c["tokens"] for comps in outputs for c in comps)
        at = 0
        for ri, u in item:  # outputs are in request order: each unit takes its own slice
            self.executor.submit(self.runs[ri], u, outputs[at: at + len(u.requests)])
            at += len(u.requests)
        if at != len(outputs):
            raise RuntimeError(f"engine {i} returned {len(outputs)} outputs for {at} requests")

    def run(self, executor: _Executor) -> None:
        import ray

        self.executor = ex = executor
        self.dispatch()
        while self.inflight or ex.pending() or self.todo:  # adaptive runs add rounds as units are recorded
            ex.collect_local(self.record)
            if len(self.disabled) == len(self.pool):
                for item in list(self.todo) + [it for _, it, _ in self.inflight.values()]:
                    self.fail(item, "no live engine left")
                self.todo.clear()
                self.inflight.clear()  # and fall through: executions already under way still finish
            self.dispatch()  # what was just recorded may have added rounds (adaptive)
            waitables = list(self.inflight) + list(self.recovering) + list(ex.refs)
            if not waitables:
                ex.wait_local(timeout=0.5)
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in self.recovering:
                    self.on_probe(ref)
                elif ref in ex.refs:
                    ex.on_ref(ref, self.record)
                else:
                    self.on_engine_output(ref)
            self.dispatch()
        ex.collect_local(self.record)


def run_generation(cfg: GenConfig, engine_cfg: EngineConfig, pool: EnginePool | None = None,
                   lora: dict | None = None) -> GenResult:
    """Run (or resume) one generation run. With `pool`, reuse running engines (and `lora` if given)."""
    return run_generations([cfg], engine_cfg, pool=pool, lora=lora)[0]


def run_generations(cfgs: Sequence[GenConfig], engine_cfg: EngineConfig, pool: EnginePool | None = None,
                    lora: dict | None = None, sequences_per_call: int = 0,
                    serving: dict[str, Any] | None = None,
                    loras: Sequence[dict | None] | None = None) -> list[GenResult]:
    """Run (or resume) several runs in one pass: their units share one queue and, with `sequences_per_call`, one
    engine call (eval: every seed of a variant at once, so the engines see full batches and the tail is paid once).
    Each run keeps its own folder, manifest, seeds and resume; its rows are the same whatever it was batched with.
    All runs share one execution config (one executor). `lora` serves every run; `loras` gives each run its own
    (None = base): runs of different adapters share calls only where the engines can mix them in a batch."""
    import ray
    from tqdm.auto import tqdm

    from gen.model_source import resolve_model

    if not cfgs:
        raise ValueError("run_generations: no runs given")
    execution = cfgs[0].execution
    if any(c.execution != execution for c in cfgs):
        raise ValueError("runs of one pass must share one execution config")
    if len({c.out for c in cfgs}) != len(cfgs):
        raise ValueError(f"runs of one pass need distinct output folders, got {[c.out for c in cfgs]}")
    if loras is not None and (lora is not None or len(loras) != len(cfgs) or pool is None):
        raise ValueError("run_generations: loras needs one entry per run, running engines, and no lora")
    run_loras = list(loras) if loras is not None else [lora] * len(cfgs)
    model_path = pool.model_path if pool is not None else resolve_model(engine_cfg.model)
    # `serving` describes how an adapter is served: with per-run adapters, only the runs that have one
    specs = [prepare_run(c, engine_cfg, model_path, lr, serving if loras is None or lr is not None else None,
                         pool.use_gpu if pool is not None else None)
             for c, lr in zip(cfgs, run_loras)]
    executor = _Executor(execution)  # first: a machine it refuses costs nothing, writes nothing
    runs: list[_Run] = []
    try:
        for c, spec in zip(cfgs, specs):
            store = ShardStore(c.out)
            manifest = store.open_run(spec.run_id, spec.identity)
            ctx = {"run_id": spec.run_id, "seed": c.seed, "model": spec.identity["model"],
                   "adapter": spec.adapter_label, "prompts": spec.prompts,
                   "cpu_limits": spec.time_limits["limits"] if spec.time_limits else {}}
            runs.append(_Run(c, spec, store, manifest, ctx, [u for u in spec.units if u.unit_id not in manifest.units],
                             run_loras[len(runs)]))
            if spec.adaptive is not None:
                open_adaptive(runs[-1])
    except BaseException:
        executor.close(wait=False)
        raise
    mixed = pool is not None and getattr(pool, "mixed_lora_batches", False)
    groups = None if mixed else [None if r.lora is None else r.lora["id"] for r in runs]
    items = pack_items([r.todo for r in runs], sequences_per_call, groups)
    driver = None
    if items:
        total = sum(r.planned_samples() for r in runs)
        started_ray = ensure_ray(cfgs[0].ray_address or None)
        own_pool = pool is None
        interrupted = False
        try:
            if own_pool:
                pool = EnginePool(engine_cfg, model_path)
            planned = specs[0].identity["engine"]["dtype"]
            if pool.engine_kwargs["dtype"] != planned:  # device `auto` resolved differently once Ray was up
                raise ValueError(f"engine.dtype: the run was planned for {planned} but the engines run "
                                 f"{pool.engine_kwargs['dtype']}; set engine.dtype (and engine.device) explicitly")
            adapter = cfgs[0].adapter
            if adapter and lora is None and loras is None:
                lora = pool.load_adapter(adapter)
                for r in runs:
                    r.lora = lora
            executor.warn_if_no_cpu()
            label = runs[0].spec.run_id if len(runs) == 1 else f"{len(runs)} runs"
            bar = tqdm(total=total, initial=sum(sum(u["rows"] for u in r.manifest.units.values()) for r in runs),
                       unit="sample",
                       desc=f"gen {label}", disable=not cfgs[0].progress, dynamic_ncols=True)
            driver = _Driver(runs, items, engine_cfg, pool, bar)
            driver.run(executor)
            bar.close()
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            executor.close(wait=not interrupted)
            if own_pool and pool is not None:
                pool.shutdown()
            if started_ray and (own_pool or interrupted):
                ray.shutdown()
    else:
        executor.close(wait=True)
    results = []
    for run in runs:
        m = run.manifest
        isolation = list(m.summary.get("isolation", []))  # a resumed run keeps what earlier calls recorded
        if driver is not None:
            isolation += [r for r in executor.isolation if r not in isolation]
        window = (run.cfg.pass_rate_min, run.cfg.pass_rate_max)
        m.summary = {**m.summary, **summarize(run.store, window, run.cfg.enough_per_side), "failed_units": run.failed, "isolation": isolation,
                     "policy": run.cfg.policy, "time_limits": run.spec.time_limits}
        if run.plan is not None:
            m.summary["stopped"] = dict(sorted(collections.Counter(run.plan.stopped().values()).items()))
        if driver is not None:
            m.summary["engine_dtype"] = {"dtype": pool.engine_kwargs["dtype"], "why": getattr(pool, "dtype_why", "")}
        if driver is not None:
            m.summary["weak_isolation_allowed"] = execution.allow_weak_isolation
        m.complete = run.is_complete()
        run.store.write_manifest(m)
        results.append(GenResult(run.cfg.out, run.spec.run_id, m.summary["rows"], m.complete, run.failed, m.summary,
                                 (driver.requeued + executor.retried) if driver is not None else 0))
    return results


def print_summary(res: GenResult) -> None:
    s = res.summary
    print(f"\n{res.run_id}: {s['rows']} rows in {res.out} ({'complete' if res.complete else 'INCOMPLETE'})")
    if s.get("pass_rate") is not None:
        print(f"  pass rate {s['pass_rate']:.2%} over {s['problems']} problems; "
              f"{s['problems_pass_and_fail']} problems have >=1 pass and >=1 fail")
    lo, hi = s["pass_rate_window"]
    counts = sorted(s["samples_per_problem"].values()) or [0]
    stopped = ", ".join(f"{k} {v}" for k, v in s.get("stopped", {}).items())
    print(f"  policy {s['policy']}: {counts[0]}-{counts[-1]} samples per problem"
          + (f" (stopped: {stopped})" if stopped else ""))
    per_pair = s["tokens_per_usable_pair"]
    print(f"  usable for pairs (pass rate in {lo:g}..{hi:g}): {s['usable_problems']} problems, "
          f"{s['usable_pairs']} pairs (sum of min(passes, fails)); {s['generated_tokens']} tokens generated, "
          + (f"{per_pair:.0f} per usable pair" if per_pair else "no usable pair")
          + (f"; {s['usable_pairs_at_cap']} pairs at most {s['pairs_cap']} per problem (gen.enough_per_side)"
             if "pairs_cap" in s else ""))
    width = max((len(k) for k in s["outcomes"]), default=0)
    for k, v in sorted(s["outcomes"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<{width}}  {v:>8}  {v / max(s['rows'], 1):6.1%}")
    if s.get("infra_errors"):
        print(f"  ({s['infra_errors']} INFRA_ERROR rows are harness faults, excluded from the pass rate)")
    tl = s.get("time_limits")
    if tl:
        lim = sorted(tl["limits"].values())
        failed = {k: v for k, v in tl["kept_fixed"].items() if v.startswith("reference ")}
        print(f"  CPU limits from references (floor {tl['floor_s']:g} s, factor {tl['factor']:g}): "
              f"{lim[0]:g}-{lim[-1]:g} s, median {lim[len(lim) // 2]:g} s; {len(tl['kept_fixed'])} problems kept "
              f"{tl['cap_s']:g} s" + (f" ({len(failed)} whose reference does not pass: "
                                      f"{', '.join(sorted(failed)[:5])})" if failed else ""))
    for uid, why in res.failed_units.items():
        print(f"  FAILED unit {uid}: {why}")
