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
import functools
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gen.engine import EngineConfig, EnginePool, ensure_ray
from gen.plan import Unit, make_plan
from gen.shards import ShardStore, rows_to_table
from tasks.problems import SPLITS

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class GenConfig:
    out: str = "runs/gen"  # run folder: local path or pyarrow URI (s3://...); holds exactly one run
    problems: str = "humaneval"  # humaneval | mbpp | path/to/problems.jsonl
    split: str = "all"  # all | train | eval (deterministic hash split, see tasks.problems.split_problems)
    eval_fraction: float = 0.5  # share of problems in the eval split
    split_seed: int = 0
    limit: int = 0  # first N problems of the split (0 = all); for quick runs
    n: int = 64  # samples per problem; a problem yields pairs only if it has >=1 pass and >=1 fail
    max_tokens: int = 512  # HumanEval solutions are < 300 tokens; longer is rambling
    temperature: float = 0.8  # diversity for oversampling; eval uses its own (lower) temperature
    top_p: float = 0.95
    prompt_style: str = "auto"  # chat | base | auto (chat if the tokenizer has a chat template)
    # Chat style only: the assistant turn is pre-filled with an opening fence and generation stops at the closing
    # one, so completions are code only: ~2-3x fewer tokens than code + explanation, and no prose to parse.
    response_prefix: str = "```python\n"
    seed: int = 0  # run seed; every sample's seed derives from (seed, problem, sample index)
    problems_per_unit: int = 4  # a unit is this many problems x samples_per_unit samples
    samples_per_unit: int = 0  # 0 = n (one block); smaller blocks rebalance faster on big n
    inflight_per_engine: int = 2  # units queued per engine so it never idles between units
    logprobs: bool = True  # record cumulative logprob of each completion
    ignore_eos: bool = False  # benchmarks only: force max_tokens per completion
    execute: bool = True  # False: record completions only (outcome INFRA_ERROR "not executed"); benchmarks
    # local: a sandbox on the driver's machine (a cluster's head node); ray: each unit's execution is a Ray task
    # asking for 1 CPU, run wherever the cluster has one (a HumanEval unit of 4 x 64 samples is ~3 s of one core).
    executor: str = "local"
    exec_workers: int = 0  # executor=local: sandbox workers (0 = all cores); ray: 1 per task
    cpu_timeout_s: float = 5.0  # CPU-seconds per execution (primary timeout)
    max_unit_attempts: int = 3  # a unit failing this often is reported, not retried forever
    adapter: str = ""  # optional LoRA folder to sample from (rows record it)
    adapter_name: str = ""  # label recorded in rows' adapter column (default: the folder path)
    run_id: str = ""  # default: derived from the run's identity
    ray_address: str = ""  # "" = $RAY_ADDRESS or a local Ray
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"gen.n must be > 0, got {self.n}")
        if self.split not in SPLITS:
            raise ValueError(f"gen.split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"gen.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.limit < 0:
            raise ValueError(f"gen.limit must be >= 0, got {self.limit}")
        if self.max_tokens <= 0:
            raise ValueError(f"gen.max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"gen.temperature must be in [0, 2] (vLLM's range), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"gen.top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_style not in ("auto", "chat", "base"):
            raise ValueError(f"gen.prompt_style must be auto|chat|base, got {self.prompt_style!r}")
        if self.problems_per_unit <= 0:
            raise ValueError(f"gen.problems_per_unit must be > 0, got {self.problems_per_unit}")
        if self.samples_per_unit < 0:
            raise ValueError(f"gen.samples_per_unit must be >= 0, got {self.samples_per_unit}")
        if self.inflight_per_engine <= 0:
            raise ValueError(f"gen.inflight_per_engine must be > 0, got {self.inflight_per_engine}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"gen.executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.max_unit_attempts <= 0:
            raise ValueError(f"gen.max_unit_attempts must be > 0, got {self.max_unit_attempts}")
        if self.cpu_timeout_s <= 0:
            raise ValueError(f"gen.cpu_timeout_s must be > 0, got {self.cpu_timeout_s}")
        if not self.out:
            raise ValueError("gen.out must name an output folder")


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
    from sandbox import Job, Outcome

    rows, jobs, job_rows = [], [], []
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
            jobs.append(Job(program=program, test=problem.test, entry_point=problem.entry_point))
            job_rows.append(row)
    if jobs:
        for row, res in zip(job_rows, sandbox.run(jobs), strict=True):
            row.update(
                outcome=res.outcome.value,
                phase=res.phase.value if res.phase is not None else None,
                error_type=res.error_type,
                error_message=res.error_message,
                exec_time_s=float(res.exec_time_s),
            )
    return rows


_WORKER_SANDBOXES: dict[float, Any] = {}  # executor=ray: one warm sandbox per Ray worker process, reused by tasks


def execute_unit_task(problems, style, unit: Unit, outputs: list[list[dict]], ctx: dict,
                      cpu_timeout_s: float) -> list[dict]:
    """Body of the Ray task behind gen.executor=ray: label one unit's completions in this worker's sandbox."""
    box = _WORKER_SANDBOXES.get(cpu_timeout_s)
    if box is None:
        from sandbox import Limits, Sandbox

        box = _WORKER_SANDBOXES[cpu_timeout_s] = Sandbox(workers=1, limits=Limits(cpu_s=cpu_timeout_s, wall_s=max(30.0, 4 * cpu_timeout_s)))
    return _execute_unit(box, problems, style, unit, outputs, ctx)


def summarize(store: ShardStore) -> dict[str, Any]:
    """Rows, pass rate, outcome counts, and problems usable for pairs (>=1 pass and >=1 fail)."""
    t = store.read_table(columns=["problem_id", "outcome"])
    outcomes = t.column("outcome").to_pylist()
    pids = t.column("problem_id").to_pylist()
    counts = collections.Counter(outcomes)
    scored = sum(v for k, v in counts.items() if k != "INFRA_ERROR")
    per = collections.defaultdict(lambda: [0, 0])
    for pid, o in zip(pids, outcomes):
        if o == "INFRA_ERROR":
            continue
        per[pid][0 if o == "PASS" else 1] += 1
    return {
        "rows": len(outcomes),
        "pass_rate": counts.get("PASS", 0) / scored if scored else None,
        "outcomes": dict(sorted(counts.items())),
        "infra_errors": counts.get("INFRA_ERROR", 0),
        "problems": len(set(pids)),
        "problems_pass_and_fail": sum(1 for p, f in per.values() if p and f),
    }


def run_generation(cfg: GenConfig, engine_cfg: EngineConfig, pool: EnginePool | None = None,
                   lora: dict | None = None) -> GenResult:
    """Run (or resume) one generation run. With `pool`, reuse running engines (and `lora` if given)."""
    import ray
    from tqdm.auto import tqdm

    from gen.model_source import model_identity, resolve_model

    problems_list = select_problems(cfg)
    problems = {p.id: p for p in problems_list}
    model_path = pool.model_path if pool is not None else resolve_model(engine_cfg.model)
    ident_model = model_identity(engine_cfg.model)
    from tasks.problems import problem_set_fingerprint

    adapter_label = cfg.adapter_name or (os.path.abspath(cfg.adapter) if cfg.adapter else None)
    if lora is not None and adapter_label is None:
        adapter_label = lora["path"]
    if cfg.adapter and not os.path.isdir(cfg.adapter):
        raise ValueError(f"gen.adapter: no such adapter folder {cfg.adapter!r}")
    samples_per_unit = cfg.samples_per_unit or cfg.n
    renderer = _Renderer(model_path, cfg.prompt_style, engine_cfg.max_model_len, cfg.response_prefix)
    identity = {
        "model": ident_model["name"], "model_fingerprint": ident_model["fingerprint"],
        "adapter": adapter_label, "problems": cfg.problems,
        "problem_set": problem_set_fingerprint(problems_list), "split": cfg.split,
        "eval_fraction": cfg.eval_fraction, "split_seed": cfg.split_seed, "limit": cfg.limit, "n": cfg.n,
        "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "prompt_style": renderer.style, "response_prefix": renderer.response_prefix, "seed": cfg.seed, "problems_per_unit": cfg.problems_per_unit,
        "samples_per_unit": samples_per_unit, "ignore_eos": cfg.ignore_eos, "execute": cfg.execute,
    }
    run_id = cfg.run_id or f"gen-{_digest(identity)[:12]}"
    units = make_plan([p.id for p in problems_list], cfg.n, cfg.seed, cfg.problems_per_unit, samples_per_unit)
    prompts = {p.id: renderer.prompt(p) for p in problems_list}
    budgets = {pid: renderer.budget(pr, cfg.max_tokens, pid) for pid, pr in prompts.items()}

    store = ShardStore(cfg.out)
    manifest = store.open_run(run_id, identity)
    todo = collections.deque(u for u in units if u.unit_id not in manifest.units)
    total = sum(u.num_samples for u in units)
    done_samples = total - sum(u.num_samples for u in todo)
    ctx = {"run_id": run_id, "seed": cfg.seed, "model": ident_model["name"], "adapter": adapter_label,
           "prompts": prompts}

    def sampling(req) -> dict[str, Any]:
        s = {"n": req.size, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": req.seed,
             "max_tokens": budgets[req.problem_id], "ignore_eos": cfg.ignore_eos}
        if renderer.stop and not cfg.ignore_eos:
            s["stop"] = renderer.stop
        if cfg.logprobs:
            s["logprobs"] = 0
        return s

    failed: dict[str, str] = {}
    attempts: collections.Counter = collections.Counter()
    requeued = 0
    if not todo:
        manifest.complete = True
        manifest.summary = summarize(store)
        store.write_manifest(manifest)
        return GenResult(cfg.out, run_id, manifest.summary["rows"], True, {}, manifest.summary)

    started_ray = ensure_ray(cfg.ray_address or None)
    own_pool = pool is None
    sandbox = None
    remote_exec = cfg.execute and cfg.executor == "ray"
    exec_refs: dict[Any, tuple[Unit, list]] = {}  # executor=ray: task ObjectRef -> (unit, engine outputs)
    pool_ = pool
    interrupted = False
    try:
        if own_pool:
            pool_ = EnginePool(engine_cfg, model_path)
        if cfg.adapter and lora is None:
            lora = pool_.load_adapter(cfg.adapter)
        if remote_exec and ray.available_resources().get("CPU", 0) < 1:
            print(f"pairloop gen: gen.executor=ray but the cluster has no free CPU for execution tasks "
                  f"({ray.cluster_resources().get('CPU', 0):g} CPUs, engines hold some); they wait for one "
                  "(an autoscaler adds nodes; on one machine use gen.executor=local)", file=sys.stderr)
        if cfg.execute and not remote_exec:
            from sandbox import Limits, Sandbox

            sandbox = Sandbox(workers=cfg.exec_workers or None, limits=Limits(cpu_s=cfg.cpu_timeout_s, wall_s=max(30.0, 4 * cfg.cpu_timeout_s)))
        executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairloop-exec")
        inflight: dict[Any, tuple[int, Unit, int]] = {}  # ObjectRef -> (engine, unit, engine epoch)
        epoch: collections.Counter = collections.Counter()  # bumps when an engine dies, so one death counts once
        exec_futs: dict[cf.Future, Unit] = {}
        stats = {"tokens": 0, "pass": 0, "scored": 0, "t0": time.perf_counter()}
        bar = tqdm(total=total, initial=done_samples, unit="sample", desc=f"gen {run_id}", disable=not cfg.progress,
                   dynamic_ncols=True)

        def load(i: int) -> int:
            return sum(1 for e, _, _ in inflight.values() if e == i)

        exec_task = ray.remote(execute_unit_task).options(num_cpus=1, max_retries=3)  # retries: lost node

        def submit_exec(u: Unit, outputs: list) -> None:
            if not remote_exec:
                exec_futs[executor.submit(_execute_unit, sandbox, problems, renderer.style, u, outputs, ctx)] = u
                return
            pids = [r.problem_id for r in u.requests]
            uctx = dict(ctx, prompts={p: prompts[p] for p in pids})
            ref = exec_task.remote({p: problems[p] for p in pids}, renderer.style, u, outputs, uctx,
                                   cfg.cpu_timeout_s)
            exec_refs[ref] = (u, outputs)

        def on_exec_task(ref) -> None:
            nonlocal requeued
            u, outputs = exec_refs.pop(ref)
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as e:  # Ray's own retries (lost worker or node) are spent
                attempts[u.unit_id] += 1
                if attempts[u.unit_id] >= cfg.max_unit_attempts:
                    failed[u.unit_id] = f"execution task failed: {type(e).__name__}: {str(e)[-300:]}"
                else:
                    requeued += 1
                    submit_exec(u, outputs)
                return
            record(u, rows)

        def finish_exec(fut: cf.Future) -> None:
            record(exec_futs.pop(fut), fut.result())

        def record(u: Unit, rows: list[dict]) -> None:
            store.write_unit(manifest, u.unit_id, rows_to_table(rows))
            stats["pass"] += sum(r["outcome"] == "PASS" for r in rows)
            stats["scored"] += sum(r["outcome"] != "INFRA_ERROR" for r in rows)
            bar.update(len(rows))
            el = time.perf_counter() - stats["t0"]
            post = {"tok/s": f"{stats['tokens'] / el:.0f}"}
            if stats["scored"]:
                post["pass"] = f"{stats['pass'] / stats['scored']:.1%}"
            bar.set_postfix(post, refresh=False)

        recovering: dict[Any, int] = {}  # health probe ObjectRef -> engine, while a dead engine comes back
        replacements: collections.Counter = collections.Counter()
        disabled: set[int] = set()

        def dispatch() -> None:
            busy = set(recovering.values()) | disabled
            for i in range(len(pool_)):
                while i not in busy and todo and load(i) < cfg.inflight_per_engine:
                    u = todo.popleft()
                    ref = pool_.generate(i, [prompts[r.problem_id] for r in u.requests],
                                         [sampling(r) for r in u.requests], lora)
                    inflight[ref] = (i, u, epoch[i])

        def probe(i: int) -> None:
            recovering[pool_.actors[i].info.remote()] = i

        def on_probe(ref) -> None:
            i = recovering.pop(ref)
            try:
                ray.get(ref)  # the engine is back (Ray restarted the actor and rebuilt its LLM)
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.5)  # still restarting
                probe(i)
            except ray.exceptions.RayActorError:
                # Ray's restarts are used up: replace the actor with a fresh one, a bounded number of times
                replacements[i] += 1
                try:
                    ray.kill(pool_.actors[i], no_restart=True)
                except Exception:
                    pass
                if replacements[i] > engine_cfg.max_restarts:
                    disabled.add(i)
                    print(f"pairloop gen: engine {i} keeps dying; disabled", file=sys.stderr)
                    return
                pool_.actors[i] = pool_._start_actor(i)
                probe(i)

        def on_engine_death(i: int, u: Unit, ep: int, e: Exception) -> None:
            nonlocal requeued
            if ep == epoch[i]:  # first report of this death; the engine's other in-flight units fail with it
                epoch[i] += 1
                attempts[u.unit_id] += 1  # the unit that was running when it died is the suspect
                probe(i)
            if attempts[u.unit_id] >= cfg.max_unit_attempts:
                failed[u.unit_id] = f"engine died {attempts[u.unit_id]} times while running it: {type(e).__name__}"
            else:
                requeued += 1
                todo.appendleft(u)

        dispatch()
        while inflight or exec_futs or exec_refs or (recovering and todo):
            for fut in [f for f in exec_futs if f.done()]:
                finish_exec(fut)
            if len(disabled) == len(pool_):
                for u in list(todo) + [u for _, u, _ in inflight.values()]:
                    failed[u.unit_id] = "no live engine left"
                todo.clear()
                inflight.clear()  # and fall through: executions already under way still finish
            waitables = list(inflight) + list(recovering) + list(exec_refs)
            if not waitables:
                cf.wait(list(exec_futs), timeout=0.5, return_when=cf.FIRST_COMPLETED)
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in recovering:
                    on_probe(ref)
                    continue
                if ref in exec_refs:
                    on_exec_task(ref)
                    continue
                i, u, ep = inflight.pop(ref)
                try:
                    outputs = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # died, or unavailable while restarting
                    on_engine_death(i, u, ep, e)
                    continue
                except ray.exceptions.RayTaskError as e:
                    attempts[u.unit_id] += 1
                    if attempts[u.unit_id] >= cfg.max_unit_attempts:
                        failed[u.unit_id] = f"{type(e.cause).__name__ if e.cause else 'error'}: {str(e)[-300:]}"
                    else:
                        requeued += 1
                        todo.append(u)
                    continue
                stats["tokens"] += sum(c["tokens"] for comps in outputs for c in comps)
                submit_exec(u, outputs)
            dispatch()
        bar.close()
        executor.shutdown(wait=True)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        for ref in exec_refs:  # Ctrl-C: don't leave execution tasks running on the cluster
            try:
                ray.cancel(ref)
            except Exception:
                pass
        if sandbox is not None:
            sandbox.close()
        if own_pool and pool_ is not None:
            pool_.shutdown()
        if started_ray and (own_pool or interrupted):
            ray.shutdown()
    manifest.summary = summarize(store)
    manifest.summary["failed_units"] = failed
    manifest.complete = not failed and len(manifest.units) == len(units)
    store.write_manifest(manifest)
    return GenResult(cfg.out, run_id, manifest.summary["rows"], manifest.complete, failed, manifest.summary,
                     requeued)


def print_summary(res: GenResult) -> None:
    s = res.summary
    print(f"\n{res.run_id}: {s['rows']} rows in {res.out} ({'complete' if res.complete else 'INCOMPLETE'})")
    if s.get("pass_rate") is not None:
        print(f"  pass rate {s['pass_rate']:.2%} over {s['problems']} problems; "
              f"{s['problems_pass_and_fail']} problems have >=1 pass and >=1 fail (usable for pairs)")
    width = max((len(k) for k in s["outcomes"]), default=0)
    for k, v in sorted(s["outcomes"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<{width}}  {v:>8}  {v / max(s['rows'], 1):6.1%}")
    if s.get("infra_errors"):
        print(f"  ({s['infra_errors']} INFRA_ERROR rows are harness faults, excluded from the pass rate)")
    for uid, why in res.failed_units.items():
        print(f"  FAILED unit {uid}: {why}")


def main(argv: list[str]) -> int:
    from pairloop.config import load_config

    try:
        cfg = load_config(GenConfig, argv, section="gen")
        engine_cfg = load_config(EngineConfig, argv, section="engine")
    except ValueError as e:
        print(f"pairloop gen: {e}", file=sys.stderr)
        return 2
    try:
        res = run_generation(cfg, engine_cfg)
    except ValueError as e:
        print(f"pairloop gen: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npairloop gen: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    print_summary(res)
    return 0 if res.complete else 1
