"""Engine scaling on one machine: 1 engine vs 2 engines, each pinned to its own cores, same work, one run.

    python bench/engine_scaling.py                                   # smollm2-135m-instruct (real weights)
    python bench/engine_scaling.py --model tiny                      # 2-layer random model, seconds
    python bench/engine_scaling.py --model default --rounds 1        # Qwen2.5-Coder-0.5B fp32: ~3.5 GB per engine

Contenders (gen.run.run_generation with execute=false, ignore_eos: every run makes exactly
problems x n x max_tokens tokens; HumanEval chat prompts; engines started and warmed up before timing):
  1x1  one engine bound to 1 core
  2x1  two engines, 1 core each (engine.cpu_cores=1: core slices 0 and 1)   -> scaling with engines
  1x2  one engine bound to both cores                                      -> one engine per machine
The pools stay up side by side (an idle in-process vLLM engine uses no CPU) and the rounds interleave
1x1, 2x1, 1x2, ..., so a change in the machine's background load hits every contender alike; the median of the
rounds is reported. Prints samples/s, tokens/s and the ratios 2x1/1x1 and 2x1/1x2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CONTENDERS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # name -> (engines, cores per engine)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="tiny | a built-in name | a model folder")
    ap.add_argument("--problems", type=int, default=8, help="first N HumanEval problems")
    ap.add_argument("--n", type=int, default=8, help="samples per problem")
    ap.add_argument("--samples-per-unit", type=int, default=4, help="work-unit size: 16 units balance 2 engines")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sequential", action="store_true", help="one pool at a time (big models: memory)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="engine dtype (auto: what gen.hardware picks for this CPU)")
    a = ap.parse_args()

    if len(os.sched_getaffinity(0)) < 2:
        print("engine_scaling: needs at least 2 cores", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from gen.engine import EngineConfig, EnginePool, resolve_dtype
    from gen.model_source import resolve_model
    from gen.config import ExecutionConfig, GenConfig, SamplingConfig
    from gen.run import run_generation
    from gen.shards import ShardStore

    work = Path(tempfile.mkdtemp(prefix="pl-engine-scaling-"))
    if a.model == "tiny":
        from tiny_model import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny"))
    else:
        model_path = resolve_model(a.model)
    big = a.model in ("default", "qwen2.5-coder-0.5b-instruct")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
    base = EngineConfig(model=model_path, max_model_len=1024, cpu_kv_cache_gib=1.0 if big else 0.5,
                        max_num_seqs=64, enable_lora=False, dtype=a.dtype)
    load0 = os.getloadavg()[0]
    runs = 0

    def run(pool, name: str, problems: int) -> tuple[float, int]:
        nonlocal runs
        runs += 1
        cfg = GenConfig(out=str(work / f"{name}-{runs}"), problems="humaneval", limit=problems, n=a.n,
                        sampling=SamplingConfig(max_tokens=a.max_tokens, ignore_eos=True, logprobs=False),
                        execution=ExecutionConfig(execute=False), problems_per_unit=1,
                        samples_per_unit=a.samples_per_unit, progress=False, seed=runs)
        t0 = time.perf_counter()
        res = run_generation(cfg, base, pool=pool)
        wall = time.perf_counter() - t0
        tokens = sum(ShardStore(res.out).read_table(columns=["completion_tokens"])
                     .column("completion_tokens").to_pylist())
        assert res.complete and res.rows == problems * a.n, (res.rows, res.failed_units)
        return wall, tokens

    def start(name: str):
        engines, cores = CONTENDERS[name]
        t0 = time.perf_counter()
        pool = EnginePool(replace(base, engines=engines, cpu_cores=cores), model_path,
                          use_gpu=False)
        print(f"{name}: {engines} engine(s) on cores {[i['cores'] for i in pool.infos]}, "
              f"up in {time.perf_counter() - t0:.0f} s", flush=True)
        run(pool, name, problems=1)  # warm-up: first batches compile kernels and fault in weights
        return pool

    results: dict[str, list[tuple[float, int]]] = {k: [] for k in CONTENDERS}
    pools = {} if a.sequential else {k: start(k) for k in CONTENDERS}
    try:
        for r in range(a.rounds):
            for name in CONTENDERS:
                pool = pools.get(name) or start(name)
                wall, tokens = run(pool, name, a.problems)
                results[name].append((wall, tokens))
                print(f"  round {r + 1} {name}: {a.problems * a.n / wall:7.2f} samples/s "
                      f"{tokens / wall:8.1f} tok/s ({wall:.1f} s)", flush=True)
                if a.sequential:
                    pool.shutdown()
    finally:
        for pool in pools.values():
            pool.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    samples = a.problems * a.n
    med = {k: statistics.median(samples / w for w, _ in v) for k, v in results.items()}
    tok = {k: statistics.median(t / w for w, t in v) for k, v in results.items()}
    print(f"\nmodel {a.model}: {a.problems} HumanEval problems x n={a.n} x {a.max_tokens} tokens (ignore_eos), "
          f"dtype {resolve_dtype(base, False)[0]}, units of {a.samples_per_unit} samples, median of {a.rounds} rounds; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'contender':<10}{'samples/s':>12}{'tokens/s':>12}")
    for k in CONTENDERS:
        print(f"{k:<10}{med[k]:>12.2f}{tok[k]:>12.1f}")
    print(f"2 engines / 1 engine, one core each (2x1 / 1x1): {med['2x1'] / med['1x1']:.2f}x")
    print(f"2 engines x 1 core / 1 engine x 2 cores (2x1 / 1x2): {med['2x1'] / med['1x2']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
