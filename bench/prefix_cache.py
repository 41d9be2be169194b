"""What vLLM's automatic prefix caching buys an evaluation on this machine: the same eval with it on and off.

    .venv/bin/python bench/prefix_cache.py                                  # 16 problems x 3 seeds, float32
    .venv/bin/python bench/prefix_cache.py --problems 24 --max-tokens 384 --dtype bfloat16 --rounds 2

The eval's seeds share each problem's prompt (and gen's n samples share theirs), which is what the cache can
reuse. One engine at a time, started and warmed before timing; `--rounds` alternates on/off. Per contender: the
base model's eval (include_base, no adapter) of `--problems` HumanEval problems x `--seeds` seeds x k=1 (temperature
0.2, one pass), its wall time, generated tokens, and whether the completions equal the other contender's (the cache
reuses KV computed in another batch; float32 should flip nothing, bf16 may flip a few).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def completions(result_dirs: dict[str, list[str]]) -> tuple[dict[tuple, str], int]:
    """(problem, eval seed, sample) -> completion, and the generated tokens, over every run folder."""
    from gen.shards import ShardStore

    out, tokens = {}, 0
    for ds in result_dirs.values():
        for d in ds:
            t = ShardStore(d).read_table(columns=["problem_id", "run_seed", "sample_index", "completion",
                                                  "completion_tokens"]).to_pylist()
            out.update({(r["problem_id"], r["run_seed"], r["sample_index"]): r["completion"] for r in t})
            tokens += sum(r["completion_tokens"] for r in t)
    return out, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    if a.problems < 1 or a.seeds < 1 or a.rounds < 1 or a.max_tokens < 1:
        raise SystemExit("--problems, --seeds, --rounds and --max-tokens must be >= 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))
    import ray

    from eval.run import EvalConfig, run_eval
    from gen.config import SamplingConfig
    from gen.engine import EngineConfig, EnginePool, ensure_ray
    from gen.model_source import resolve_model

    model_path = resolve_model(a.model)
    base = EngineConfig(model=a.model, dtype=a.dtype, max_model_len=1536, cpu_kv_cache_gib=2.0, enable_lora=False)
    walls: dict[str, list[float]] = {"on": [], "off": []}
    tokens: dict[str, int] = {}
    outs: dict[str, dict[tuple, str]] = {}
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in ("on", "off"):
                cfg = replace(base, enable_prefix_caching=mode == "on")
                pool = EnginePool(cfg, model_path)
                try:
                    resolved = {i.get("prefix_caching") for i in pool.infos}
                    if resolved != {mode == "on"}:
                        raise SystemExit(f"prefix caching {mode} asked, the engines resolved {resolved}")
                    warm = EvalConfig(out=f"{tmp}/warm-{mode}-{r}", problems="humaneval", limit=1, seeds=[99], k=1,
                                      sampling=SamplingConfig(max_tokens=8), progress=False)
                    run_eval(warm, cfg, pool=pool, report=False)
                    ev = EvalConfig(out=f"{tmp}/{mode}-{r}", problems="humaneval", limit=a.problems,
                                    seeds=list(range(a.seeds)), k=1,
                                    sampling=SamplingConfig(max_tokens=a.max_tokens, temperature=0.2), progress=False)
                    t0 = time.perf_counter()
                    res = run_eval(ev, cfg, pool=pool, report=False)
                    walls[mode].append(time.perf_counter() - t0)
                finally:
                    pool.shutdown()
                got, tokens[mode] = completions(res.result_dirs)
                outs.setdefault(mode, got)
                print(f"round {r + 1} prefix caching {mode}: {walls[mode][-1]:.1f} s, {tokens[mode]} tokens "
                      f"({tokens[mode] / walls[mode][-1]:.1f} tok/s)", flush=True)
    ray.shutdown()
    keys = sorted(set(outs["on"]) | set(outs["off"]))
    same = sum(outs["on"].get(k) == outs["off"].get(k) for k in keys)
    on, off = statistics.median(walls["on"]), statistics.median(walls["off"])
    print(f"\nmodel {a.model}, dtype {a.dtype}: base eval of {a.problems} HumanEval problems x {a.seeds} seeds x k=1, "
          f"max_tokens {a.max_tokens}, median of {a.rounds} round(s); load average {os.getloadavg()[0]:.1f}")
    print(f"prefix caching on: {on:.1f} s   off: {off:.1f} s   off / on = {off / on:.2f}x")
    print(f"completions identical on vs off: {same}/{len(keys)}")
    print("RESULTS_JSON " + json.dumps({"walls": walls, "identical": same, "samples": len(keys),
                                        "tokens": tokens, "dtype": a.dtype, "problems": a.problems}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
