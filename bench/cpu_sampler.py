"""vLLM's sort-based top-p vs pairloop's top-candidates top-p (gen/cpu_sampler.py) on CPU engines, in one run.

    .venv/bin/python bench/cpu_sampler.py                          # built-in 0.5B model, engine.dtype auto
    .venv/bin/python bench/cpu_sampler.py --prompts 16 --n 8 --tokens 128

For each top-p (PAIRLOOP_TOP_P=vllm, then topk; --rounds alternates them), one engine on the real model and the
same requests (HumanEval prompts, fixed lengths: ignore_eos), three workloads:
  gen     --prompts x n=--n at temperature 0.8, top-p 0.95 (the pool's sampling)
  eval    --prompts x 3 seeds at temperature 0.2, top-p 0.95 (the re-evaluation's)
  greedy  --prompts x 1 at temperature 0 (no top-p at all: the model's own pace, a control)
Prints tokens/s of each, the ratio, and how many completions are the same text under both (the same seeds: they
differ only where a tie at the nucleus boundary or float32 rounding of p changed a kept set and the draw fell on it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def workloads(a) -> dict[str, list[dict]]:
    gen = [{"n": a.n, "temperature": 0.8, "top_p": 0.95, "seed": 100 + i, "max_tokens": a.tokens, "ignore_eos": True}
           for i in range(a.prompts)]
    ev = [{"n": 1, "temperature": 0.2, "top_p": 0.95, "seed": 1000 * s + i, "max_tokens": a.tokens,
           "ignore_eos": True} for s in range(3) for i in range(a.prompts)]
    greedy = [{"n": 1, "temperature": 0.0, "max_tokens": a.tokens, "ignore_eos": True} for _ in range(a.prompts)]
    return {"gen": gen, "eval": ev, "greedy": greedy}


def run_one(top_p: str, a, model_path: str, prompts: list[str]) -> dict:
    import ray

    from gen import cpu_sampler
    from gen.engine import EngineConfig, EnginePool

    os.environ[cpu_sampler.ENV] = top_p
    pool = EnginePool(EngineConfig(model=a.model, dtype=a.dtype, max_model_len=1024, cpu_kv_cache_gib=2.0),
                      model_path, use_gpu=False)
    out: dict = {"top_p": pool.top_p, "dtype": pool.engine_kwargs["dtype"]}
    try:
        ray.get(pool.generate(0, prompts[:2], [{"n": 2, "temperature": 0.8, "top_p": 0.95, "seed": 1,
                                                 "max_tokens": 8}] * 2))  # warm-up
        for name, sampling in workloads(a).items():
            ps = prompts * (len(sampling) // len(prompts))
            t = time.perf_counter()
            outs = ray.get(pool.generate(0, ps, sampling))
            secs = time.perf_counter() - t
            out[name] = {"tok_s": sum(c["tokens"] for o in outs for c in o) / secs, "seconds": secs,
                         "texts": [c["text"] for o in outs for c in o]}
    finally:
        pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="vllm, topk pairs, alternating")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    from gen.engine import ensure_ray
    from gen.model_source import resolve_model
    from tasks.problems import load_problems

    model_path = resolve_model(a.model)
    prompts = [p.prompt for p in load_problems("humaneval")[: a.prompts]]
    ensure_ray()
    runs = [(tp, run_one(tp, a, model_path, prompts)) for _ in range(a.rounds) for tp in ("vllm", "topk")]
    print(f"\n{a.prompts} HumanEval prompts, {a.tokens} tokens each (ignore_eos); dtype {runs[0][1]['dtype']}")
    print(f"{'round':<7}{'top-p':<16}" + "".join(f"{w + ' tok/s':>14}" for w in workloads(a)))
    for r in range(a.rounds):
        v, t = runs[2 * r][1], runs[2 * r + 1][1]
        for res in (v, t):
            print(f"{r:<7}{res['top_p']:<16}" + "".join(f"{res[w]['tok_s']:>14.1f}" for w in workloads(a)))
        print(f"{r:<7}{'topk / vllm':<16}" + "".join(f"{t[w]['tok_s'] / v[w]['tok_s']:>13.2f}x" for w in workloads(a)))
        print(f"{r:<7}{'same texts':<16}" + "".join(
            f"{sum(x == y for x, y in zip(v[w]['texts'], t[w]['texts'])):>8}/{len(v[w]['texts']):<5}"
            for w in workloads(a)))
    if a.json:
        Path(a.json).write_text(json.dumps([{"top_p": tp, **{w: {k: x for k, x in res[w].items() if k != "texts"}
                                                           for w in workloads(a)}} for tp, res in runs], indent=1))


if __name__ == "__main__":
    main()
