"""How well the hot-load check (gen/probe.py) tells the trained adapter from wrong ones, per engine dtype.

    .venv/bin/python bench/hotload_power.py --adapter runs/demo/adapter            # float32 and bfloat16
    .venv/bin/python bench/hotload_power.py --adapter A --dtypes bfloat16 --no-merged

One engine per dtype (the loop's Ray actor + vLLM), the adapter's PEFT float32 probe log-probs as the reference
(eval.run.probe_reference: train/'s record, else PEFT from the files), and the engine asked to serve, under that reference:
  right    the adapter as trained
  noop     its lora_B zeroed: an adapter that loads and does nothing (vllm#34186)
  half     lora_B x 0.5: an earlier checkpoint's smaller step, or a lost lora_alpha scaling
  double   lora_B x 2
  other    every lora_A / lora_B replaced by seeded Gaussian noise of the same Frobenius norm: another adapter
  merged   the adapter folded into the weights (eval.adapter_mode merged), its own engine, compared with the base
Per case: the adapter's effect on the probe (L2 over tokens, PEFT), the engine's absolute noise (base engine vs PEFT
base, x sqrt 2), the residual |d_engine - d_PEFT| (the differential error the check rests on), and the verdict of
gen.probe.compare. Every case but `right` and `merged` must be refused; those two pass only where the dtype's noise
leaves the adapter's effect resolvable (docs/benchmarks.md, "The hot-load check's resolution").

--pairs DIR --sequences M adds a research measurement (gen.probe is unchanged): the adapter's own training texts
(chat template of prompt + chosen, prompt + rejected, for the first pairs of DIR/pairs.parquet; M sequences of up to
--max-seq-tokens) as a long probe, and a projection statistic on it: beta = <d_engine, d_PEFT> / |d_PEFT|^2 (1 for
the adapter as trained, 0 for a no-op, 0.5 / 2 for half / double, ~0 for another adapter) with its noise
sigma_beta = sqrt2 x (the engine's per-token base noise) / |d_PEFT|, which falls as the probe grows (L2 ratios do
not). Printed per case: beta, sigma_beta, and the z-scores of beta against 1 and against 0. sigma_beta assumes
the engine's rounding is independent across tokens; bf16's is not (measured: the adapter as trained gives beta
0.915 in bf16, 40 sigma_beta from 1), so what decides is how far apart the cases' betas lie.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("right", "noop", "half", "double", "other")


def derived_adapter(src: str, case: str, dst: Path) -> str:
    """A copy of the adapter folder with its tensors changed as `case` says (see the module docstring)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in os.listdir(src):
        if f != "adapter_model.safetensors" and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst / f)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for k, t in tensors.items():
        if case == "right":
            out[k] = t
        elif case == "other" and ("lora_A" in k or "lora_B" in k):
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            out[k] = (r * (t.float().norm() / r.norm().clamp_min(1e-30))).to(t.dtype)
        elif "lora_B" in k:
            out[k] = t * {"noop": 0.0, "half": 0.5, "double": 2.0}.get(case, 1.0)
        else:
            out[k] = t
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "adapter_model.safetensors"))
    return str(dst)


def measures(served: list[float], base: list[float], ref: dict, tol: float) -> dict:
    from gen.probe import compare, measure

    return {**measure(served, base, ref), "verdict": compare(served, base, ref, tol) or "pass"}


def long_probe(a, model_path: str) -> dict:
    """PEFT float32 log-probs (adapter on and off) of the adapter's own training texts: see --pairs."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen.probe import token_logprobs

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = pq.read_table(os.path.join(a.pairs, "pairs.parquet"), columns=["prompt", "chosen", "rejected"]).to_pylist()
    seqs = []
    for r in rows:
        for side in ("chosen", "rejected"):
            if len(seqs) < a.sequences:
                ids = tok.apply_chat_template(list(r["prompt"]) + list(r[side]), tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in some transformers versions
                seqs.append(list(ids)[: a.max_seq_tokens])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), a.adapter)
    model.eval()
    adapter = [token_logprobs(model, ids) for ids in seqs]
    with model.disable_adapter():
        base = [token_logprobs(model, ids) for ids in seqs]
    return {"seqs": seqs, "adapter": adapter, "base": base}


def projection(served: list[list[float]], base: list[list[float]], lp: dict) -> dict:
    """beta and sigma_beta of the engine's effect projected on PEFT's (see the module docstring)."""
    import numpy as np

    cat = lambda xs: np.concatenate([np.asarray(x, dtype=np.float64) for x in xs])  # noqa: E731
    d_ref, d_eng = cat(lp["adapter"]) - cat(lp["base"]), cat(served) - cat(base)
    noise = cat(base) - cat(lp["base"])
    sigma_tok = float(np.sqrt(np.mean(noise ** 2)))
    norm = float(np.linalg.norm(d_ref))
    beta = float(d_eng @ d_ref / max(norm ** 2, 1e-30))
    sb = float(np.sqrt(2) * sigma_tok / max(norm, 1e-30))
    return {"tokens": int(d_ref.size), "effect": norm, "sigma_token": sigma_tok, "beta": beta, "sigma_beta": sb,
            "z_vs_1": (beta - 1) / sb, "z_vs_0": beta / sb}


def run_dtype(dtype: str, a, model_path: str, ref: dict, tmp: Path, lp: dict | None = None) -> dict:
    import ray

    from eval.run import merge_adapter
    from gen.engine import EngineConfig, EnginePool
    from gen.probe import tolerance

    tol = tolerance(dtype)
    ecfg = EngineConfig(model=a.model, dtype=dtype, max_model_len=max(1024, a.max_seq_tokens + 8), cpu_kv_cache_gib=1.0)
    out: dict = {"tolerance": tol}
    t0 = time.perf_counter()
    pool = EnginePool(ecfg, model_path, use_gpu=False)
    out["start_s"] = time.perf_counter() - t0
    ids = ref["token_ids"]
    try:
        base = ray.get(pool.actors[0].prompt_logprobs.remote(ids, None))
        long_base = [ray.get(pool.actors[0].prompt_logprobs.remote(q, None)) for q in lp["seqs"]] if lp else None
        for case in CASES:
            path = derived_adapter(a.adapter, case, tmp / f"{dtype}-{case}")
            lora = pool.load_adapter(path, name_prefix=case)
            served = ray.get(pool.actors[0].prompt_logprobs.remote(ids, lora))
            out[case] = measures(served, base, ref, tol)
            if lp:
                long_served = [ray.get(pool.actors[0].prompt_logprobs.remote(q, lora)) for q in lp["seqs"]]
                out[case]["projection"] = projection(long_served, long_base, lp)
            pool.unload_adapter(lora)
        if a.merged:
            merged = merge_adapter(model_path, a.adapter)
            mpool = EnginePool(replace(ecfg, model=merged, enable_lora=False), merged, use_gpu=False)
            try:
                served = ray.get(mpool.actors[0].prompt_logprobs.remote(ids, None))
            finally:
                mpool.shutdown()
            out["merged"] = measures(served, base, ref, tol)
    finally:
        pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapter", required=True, help="a trained adapter folder (train/'s output)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-merged", dest="merged", action="store_false", help="skip the merged-engine case")
    ap.add_argument("--json", default="")
    ap.add_argument("--pairs", default="", help="the adapter's pairs folder: adds the long-probe projection (above)")
    ap.add_argument("--sequences", type=int, default=8, help="--pairs: sequences in the long probe")
    ap.add_argument("--max-seq-tokens", type=int, default=768, help="--pairs: tokens per sequence at most")
    a = ap.parse_args()
    if a.pairs and not os.path.isfile(os.path.join(a.pairs, "pairs.parquet")):
        sys.exit(f"--pairs {a.pairs!r}: no pairs.parquet there")
    if a.sequences < 1 or a.max_seq_tokens < 2:
        sys.exit(f"--sequences {a.sequences} / --max-seq-tokens {a.max_seq_tokens}: must be >= 1 / >= 2")
    if not os.path.isfile(os.path.join(a.adapter, "adapter_model.safetensors")):
        sys.exit(f"--adapter {a.adapter!r}: no adapter_model.safetensors there")

    from eval.run import probe_reference
    from gen.engine import ensure_ray
    from gen.model_source import resolve_model

    model_path = resolve_model(a.model)
    ref = probe_reference(a.adapter, model_path)  # train/'s record if the manifest has it, else PEFT now
    lp = long_probe(a, model_path) if a.pairs else None
    ensure_ray()
    res: dict = {"adapter": a.adapter, "tokens": len(ref["token_ids"]) - 1}
    with tempfile.TemporaryDirectory() as d:
        for dtype in a.dtypes:
            res[dtype] = run_dtype(dtype, a, model_path, ref, Path(d), lp)
    print(f"\nprobe: {res['tokens']} tokens; effect = |PEFT adapter - PEFT base| (L2), noise = sqrt2 |engine base - PEFT "
          f"base|, residual = |engine effect - PEFT effect|")
    print(f"{'dtype':<9}{'served':<8}{'effect':>9}{'noise':>9}{'residual':>10}{'res/eff':>9}{'eng eff':>9}"
          f"{'max|d|':>9}  verdict")
    for dtype in a.dtypes:
        for case in (*CASES, "merged"):
            m = res[dtype].get(case)
            if m is None:
                continue
            print(f"{dtype:<9}{case:<8}{m['effect']:>9.4f}{m['noise']:>9.4f}{m['residual']:>10.4f}"
                  f"{m['residual'] / max(m['effect'], 1e-30):>9.3f}{m['engine_effect']:>9.4f}"
                  f"{m['max_abs_diff']:>9.4f}  {m['verdict'][:110]}")
    if lp:
        n = sum(len(q) - 1 for q in lp["seqs"])
        print(f"\nlong probe: {len(lp['seqs'])} training texts, {n} tokens; beta = engine effect projected on PEFT's")
        print(f"{'dtype':<9}{'served':<8}{'|d_PEFT|':>9}{'sigma/tok':>10}{'beta':>8}{'sigma_b(iid)':>13}{'z vs 1':>10}{'z vs 0':>10}")
        for dtype in a.dtypes:
            for case in CASES:
                m = res[dtype][case]["projection"]
                print(f"{dtype:<9}{case:<8}{m['effect']:>9.3f}{m['sigma_token']:>10.4f}{m['beta']:>8.3f}"
                      f"{m['sigma_beta']:>13.2g}{m['z_vs_1']:>10.3g}{m['z_vs_0']:>10.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
