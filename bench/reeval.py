"""Re-evaluating a new adapter over 3 seeds: hot-load into running engines vs restart engines per adapter.

    python bench/reeval.py                       # offline Qwen2.5-Coder-0.5B-Instruct, 8 problems x 3 seeds
    python bench/reeval.py --model /path --problems 16 --max-tokens 256

Both sides run the same eval (eval.run.run_eval: same problems, seeds, k, sampling) of freshly made adapters.
  hot-load  engines already running (the loop's situation); time = add_lora on every engine + the 3-seed eval
  restart   what a tool without hot-loading does: start engines with the adapter, eval, shut down, per adapter
Targets (issue 6): hot-load adds < 5 s; >= 3x faster overall on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_adapter(model_path: str, out: Path, r: int, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():  # small random weights: a real, different adapter that keeps outputs code-like
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-4)
    peft_model.save_pretrained(out)
    del model, peft_model
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from eval.run import EvalConfig, run_eval
    from gen.config import SamplingConfig
    from gen.engine import EngineConfig, EnginePool, ensure_ray
    from gen.model_source import resolve_model

    model_path = resolve_model(a.model)
    ecfg = EngineConfig(model=a.model, max_model_len=1536, cpu_kv_cache_gib=1.0, max_lora_rank=16, max_loras=4)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [make_adapter(model_path, Path(tmp) / f"adapter-{i}", a.lora_r, i) for i in range(a.adapters)]

        def cfg(tag: str, adapter: str) -> EvalConfig:
            return EvalConfig(out=str(Path(tmp) / tag), problems="humaneval", limit=a.problems, seeds=a.seeds, k=1,
                              sampling=SamplingConfig(max_tokens=a.max_tokens, temperature=0.2), include_base=False,
                              adapters=[adapter], progress=False)

        ensure_ray()
        t0 = time.perf_counter()
        pool = EnginePool(ecfg, model_path)
        start_s = time.perf_counter() - t0
        hot = []
        for i, ad in enumerate(adapters):
            t0 = time.perf_counter()
            lora = pool.load_adapter(ad, name_prefix="bench")
            load_s = time.perf_counter() - t0
            pool.unload_adapter(lora)
            t0 = time.perf_counter()
            run_eval(cfg(f"hot-{i}", ad), ecfg, pool=pool, report=False)  # loads it again, fresh name/id
            hot.append({"load_s": load_s, "total_s": load_s + time.perf_counter() - t0})
        pool.shutdown()
        restart = []
        for i, ad in enumerate(adapters):
            t0 = time.perf_counter()
            run_eval(cfg(f"restart-{i}", ad), ecfg, pool=None, report=False)  # starts + stops its own engines
            restart.append({"total_s": time.perf_counter() - t0})
        ray.shutdown()
    res = {"engine_start_s": start_s, "hot": hot, "restart": restart, "problems": a.problems, "seeds": a.seeds,
           "max_tokens": a.max_tokens, "model": a.model}
    print(f"\nmodel={a.model} problems={a.problems} seeds={a.seeds} k=1 max_tokens={a.max_tokens} "
          f"(engine start when the pool came up: {start_s:.1f} s)")
    print(f"{'adapter':>8} {'hot-load s':>11} {'hot total s':>12} {'restart total s':>16} {'speed-up':>9}")
    for i, (h, r) in enumerate(zip(hot, restart)):
        print(f"{i:>8} {h['load_s']:>11.2f} {h['total_s']:>12.1f} {r['total_s']:>16.1f} "
              f"{r['total_s'] / h['total_s']:>8.2f}x")
    print("RESULTS_JSON " + json.dumps(res))


if __name__ == "__main__":
    main()
