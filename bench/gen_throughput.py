"""Generation throughput, side by side in one run: bare vLLM vs our Ray pipeline vs HF transformers.

    python bench/gen_throughput.py                       # offline Qwen2.5-Coder-0.5B-Instruct, n=16 and 64
    python bench/gen_throughput.py --model /path --n 16 64 --prompts 4 --max-tokens 64

Same model, same prompts (HumanEval chat prompts), same n and max_tokens, fixed lengths (ignore_eos) so every
contender produces exactly prompts x n x max_tokens tokens. Each contender runs in its own subprocess (a fresh
engine each, nothing shared, memory released between them):
  bare      vllm.LLM.generate in-process, both cores bound (the library on its own), with the top-p the
            pipeline's engine applies (gen/cpu_sampler.py on CPU; PAIRLOOP_TOP_P=vllm gives both vLLM's sort)
  pipeline  gen.run.run_generation with execute=false: Ray actor + work units + shard writes
  hf        transformers generate(num_return_sequences=n), batched, torch threads = cores
Then gen with execution vs gen alone (same seeds, so the same completions; real stopping, not ignore_eos).
`--allocators glibc jemalloc-default ...` runs the bare and hf contenders once per malloc (jemalloc through
LD_PRELOAD with bench/train_speed.py's MALLOC_CONFs) and prints each one's minor page faults and kernel share.
Targets (issue 3): pipeline >= 0.95x bare vLLM; vLLM >= 5x HF on this CPU; gen+exec wall <= 1.1x gen alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import ALLOCATOR_CONFS, allocator_env  # noqa: E402  (light: argparse, os, json)


def cpu_env() -> dict[str, str]:
    n = os.cpu_count() or 1
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "OMP_NUM_THREADS": str(n), "RAY_AUTH_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
            "VLLM_CACHE_ROOT": os.path.expanduser("~/.cache/pairloop/vllm")}


def prompts_for(model_path: str, count: int) -> list[str]:
    from transformers import AutoTokenizer

    from tasks.problems import load_problems
    from tasks.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(model_path)
    return [build_prompt(p, "chat", tokenizer=tok) + "```python\n" for p in load_problems("humaneval")[:count]]


def _usage() -> tuple[float, float, int]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _with_usage(entry: dict, before: tuple[float, float, int]) -> dict:
    u, s, f = (x - y for x, y in zip(_usage(), before))
    return {**entry, "minor_faults": int(f), "kernel_share": s / (u + s) if u + s else 0.0}


def run_bare(a) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from gen import cpu_sampler

    # the top-p the pipeline's engine runs (gen/cpu_sampler.py on CPU; PAIRLOOP_TOP_P=vllm: vLLM's sort for both),
    # so pipeline / bare measures the pipeline, not a sampler
    top_p = cpu_sampler.install() if current_platform.is_cpu() else "vllm"
    llm = LLM(a.model_path, dtype=a.dtype, enable_chunked_prefill=False, gpu_memory_utilization=0.3,
              max_model_len=2048, max_num_seqs=256, seed=0)
    prompts = prompts_for(a.model_path, a.prompts)
    out = {}
    for n in a.n:
        sp = SamplingParams(n=n, max_tokens=a.max_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, seed=1)
        llm.generate(prompts[:1], SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # warm
        u0, t0 = _usage(), time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        toks = sum(len(c.token_ids) for r in res for c in r.outputs)
        out[str(n)] = _with_usage({"tokens": toks, "seconds": dt, "tok_s": toks / dt}, u0)
    out["top_p"] = top_p
    return out


def run_pipeline(a) -> dict:
    import ray

    from gen.engine import EngineConfig, EnginePool, ensure_ray
    from gen.config import ExecutionConfig, GenConfig, SamplingConfig
    from gen.run import run_generation

    problems = Path(a.tmp) / "problems.jsonl"
    from tasks.problems import load_problems

    with open(problems, "w") as f:
        for p in load_problems("humaneval")[: a.prompts]:
            f.write(json.dumps({"task_id": p.id, "prompt": p.prompt, "entry_point": p.entry_point,
                                "test": p.test}) + "\n")
    ensure_ray()
    ecfg = EngineConfig(model=a.model_path, dtype=a.dtype, max_model_len=2048, enable_lora=False, max_num_seqs=256)
    pool = EnginePool(ecfg, a.model_path, use_gpu=False)
    ray.get(pool.generate(0, ["def f():"], [{"n": 2, "max_tokens": 4}]))  # warm, like bare
    # warm the driver too (imports, tokenizer): bare's process has them loaded before its timer starts
    run_generation(GenConfig(out=str(Path(a.tmp) / "warm"), problems=str(problems), n=1,
                             sampling=SamplingConfig(max_tokens=2, prompt_style="chat"),
                             execution=ExecutionConfig(execute=False), progress=False), ecfg, pool=pool)
    out = {}
    for n in a.n:
        cfg = GenConfig(out=str(Path(a.tmp) / f"pipe-n{n}"), problems=str(problems), n=n,
                        sampling=SamplingConfig(max_tokens=a.max_tokens, ignore_eos=True, logprobs=False,
                                                prompt_style="chat"),
                        execution=ExecutionConfig(execute=False), problems_per_unit=a.prompts, seed=1,
                        progress=False)
        t0 = time.perf_counter()
        res = run_generation(cfg, ecfg, pool=pool)
        dt = time.perf_counter() - t0
        from gen.shards import ShardStore

        toks = sum(ShardStore(res.out).read_table(columns=["completion_tokens"]).column(0).to_pylist())
        out[str(n)] = {"tokens": toks, "seconds": dt, "tok_s": toks / dt}
    if a.exec_compare:
        for execute in (False, True):
            cfg = GenConfig(out=str(Path(a.tmp) / f"exec-{execute}"), problems=str(problems), n=a.exec_n,
                            sampling=SamplingConfig(max_tokens=a.exec_max_tokens, prompt_style="chat",
                                                    logprobs=False),
                            execution=ExecutionConfig(execute=execute), problems_per_unit=1, seed=2,
                            progress=False)
            t0 = time.perf_counter()
            run_generation(cfg, ecfg, pool=pool)
            out[f"exec_{execute}"] = {"seconds": time.perf_counter() - t0}
    pool.shutdown()
    return out


def run_hf(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(a.model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=getattr(torch, a.dtype)).eval()
    prompts = prompts_for(a.model_path, a.prompts)
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = {}
    for n in a.n:
        torch.manual_seed(1)
        u0, t0 = _usage(), time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=n,
                                 max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                                 pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t0
        toks = (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
        out[str(n)] = _with_usage({"tokens": int(toks), "seconds": dt, "tok_s": toks / dt}, u0)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (gen/hardware.py: what the engine's "
                   "auto picks on this CPU); the same for all three contenders")
    p.add_argument("--contenders", nargs="+", default=["bare", "pipeline", "hf"])
    p.add_argument("--allocators", nargs="+", default=["glibc"], choices=list(ALLOCATOR_CONFS),
                   help="malloc for the bare and hf contenders' processes (bench/train_speed.py --help); each one "
                        "runs them again, side by side, and the table gains a row per malloc")
    p.add_argument("--exec-compare", action="store_true", default=True)
    p.add_argument("--no-exec-compare", dest="exec_compare", action="store_false")
    p.add_argument("--exec-n", type=int, default=16)
    p.add_argument("--exec-max-tokens", type=int, default=256)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dtype == "auto":
        from gen.hardware import cpu_dtype

        a.dtype = cpu_dtype()[0]
    if a.variant:
        os.environ.update(cpu_env())
        res = {"bare": run_bare, "pipeline": run_pipeline, "hf": run_hf}[a.variant](a)
        print("RESULT " + json.dumps(res))
        return
    from gen.model_source import resolve_model

    model_path = resolve_model(a.model)
    results = {}
    runs = [(c, m) for c in a.contenders for m in (a.allocators if c in ("bare", "hf") else ["glibc"])]
    with tempfile.TemporaryDirectory() as tmp:
        for c, m in runs:
            key = c if m == "glibc" else f"{c}+{m}"
            cmd = [sys.executable, __file__, "--variant", c, "--model-path", model_path, "--tmp", tmp,
                   "--prompts", str(a.prompts), "--max-tokens", str(a.max_tokens), "--exec-n", str(a.exec_n),
                   "--exec-max-tokens", str(a.exec_max_tokens), "--dtype", a.dtype, "--n", *map(str, a.n)]
            if not a.exec_compare:
                cmd.append("--no-exec-compare")
            print(f"== {key} ...", flush=True)
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
            proc = subprocess.run(cmd, env={**env, **cpu_env(), **allocator_env(m), "PYTHONPATH": str(ROOT)},
                                  capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{key} failed")
            results[key] = json.loads(line[-1][7:])
            print(f"   {results[key]}", flush=True)
    print(f"\nmodel={a.model} dtype={a.dtype} prompts={a.prompts} max_tokens={a.max_tokens} (ignore_eos) "
          f"cores={os.cpu_count()} top_p(bare, as the pipeline's engine)={results.get('bare', {}).get('top_p', '-')}")
    print(f"{'n':>4} " + " ".join(f"{c + ' tok/s':>16}" for c in a.contenders) + "   pipeline/bare   bare/hf")
    for n in map(str, a.n):
        row = [results[c][n]["tok_s"] if c in results else float("nan") for c in a.contenders]
        r = {c: results.get(c, {}).get(n, {}).get("tok_s", float("nan")) for c in ("bare", "pipeline", "hf")}
        print(f"{n:>4} " + " ".join(f"{v:>16.1f}" for v in row)
              + f"   {r['pipeline'] / r['bare']:>13.3f}   {r['bare'] / r['hf']:>7.2f}")
    for m in a.allocators:
        if m == "glibc":
            continue
        for c in ("bare", "hf"):
            if c in results and f"{c}+{m}" in results:
                for n in map(str, a.n):
                    g, j = results[c][n], results[f"{c}+{m}"][n]
                    print(f"{c} n={n}: {m} {j['tok_s']:.1f} tok/s vs glibc {g['tok_s']:.1f} "
                          f"({j['tok_s'] / g['tok_s']:.2f}x); minor faults {g['minor_faults']:,} -> "
                          f"{j['minor_faults']:,}; kernel {g['kernel_share']:.0%} -> {j['kernel_share']:.0%}")
    pipe = results.get("pipeline", {})
    if "exec_True" in pipe:
        g, ge = pipe["exec_False"]["seconds"], pipe["exec_True"]["seconds"]
        print(f"gen alone {g:.1f} s, gen+exec {ge:.1f} s: ratio {ge / g:.3f} (target <= 1.1)")
    print("RESULTS_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
