"""How well the hot-load check (gen/probe.py) tells the trained adapter from wrong ones, per engine dtype.

    .venv/bin/python bench/hotload_power.py --adapter runs/experiment-cpu/adapter-balanced      # float32 and bf16
    .venv/bin/python bench/hotload_power.py --adapter A --dtypes bfloat16 --no-merged

One engine per dtype (the loop's Ray actor + vLLM) and the check's reference for the adapter: train/'s record
(eval.run.probe_reference) where it holds the training texts; for an adapter trained before train/ recorded them,
the same probe built now by PEFT from its files and the first pairs of the pairs file its train_manifest names (or
--pairs DIR). The engine is asked to serve, under that reference:
  right    the adapter as trained
  noop     its lora_B zeroed: an adapter that loads and does nothing (vllm#34186)
  half     lora_B x 0.5: an earlier checkpoint's smaller step, or a lost lora_alpha scaling
  double   lora_B x 2
  other    every lora_A / lora_B replaced by seeded Gaussian noise of the same Frobenius norm: another adapter
  merged   the adapter folded into the weights (eval.adapter_mode merged), its own engine, compared with the base
Per case and probe (the whole probe the check uses, and its fixed text alone, which was the whole probe before):
the adapter's effect (L2 over tokens, PEFT), the engine's noise (base engine vs PEFT base, x sqrt 2), the residual
|d_engine - d_PEFT|, the projection beta = <d_engine, d_PEFT> / |d_PEFT|^2, and gen.probe.compare's verdict. Every
case but `right` and `merged` must be refused; those two must pass where the dtype's noise leaves the adapter's
effect resolvable. Also printed: the seconds of the check itself (EnginePool.verify_adapter on `right`), as eval
runs it (gen.probe.probe_for: the fixed text alone in float32 where it resolves the adapter, the fixed text and the
shortest training-text prefix that does in bf16) and on the whole probe, and every wrong case's verdict as eval
checks it. With --merged-cases, every case is also merged into the weights and checked as eval checks a
merged adapter (EnginePool.verify_merged, the default on bf16 CPU engines), timed from its engine's first call.
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


def check_reference(a, model_path: str) -> dict:
    """The reference the check uses (see the module docstring)."""
    import pyarrow.parquet as pq

    from eval.run import probe_reference
    from gen.probe import PROBE_PAIRS, reference_from_files

    ref = probe_reference(a.adapter, model_path)
    if ref.get("pair_texts"):
        return ref
    pairs = os.path.join(a.pairs, "pairs.parquet") if a.pairs else None
    manifest = os.path.join(a.adapter, "train_manifest.json")
    if pairs is None and os.path.isfile(manifest):
        files = json.loads(Path(manifest).read_text())["pairs"]["files"]
        pairs = files[0]["path"] if files else None
    if not pairs or not os.path.isfile(pairs):
        sys.exit(f"--adapter {a.adapter!r}: its reference has no training texts and no pairs file was found "
                 f"(pass --pairs DIR)")
    rows = pq.read_table(pairs, columns=["prompt", "chosen", "rejected"]).slice(0, PROBE_PAIRS).to_pylist()
    return reference_from_files(model_path, a.adapter, rows)


def measures(served: list[float], base: list[float], ref: dict, tol: float) -> dict:
    """Both designs on the same log-probs: the two-call check (gen.probe.compare: the engine's effect over its own
    base on every token) and the one-call check (gen.probe.compare_direct: the engine's adapter log-probs against
    PEFT's, its base on the fixed text only)."""
    from gen.probe import compare, compare_direct, measure, measure_direct

    direct = measure_direct(served, base, ref)
    return {**measure(served, base, ref), "verdict": compare(served, base, ref, tol) or "pass",
            "direct_residual": direct["residual"], "direct_beta": direct["beta"],
            "direct_verdict": compare_direct(served, base, ref, tol) or "pass"}


def both(served: list[list[float]], base: list[list[float]], ref: dict, tol: float) -> dict:
    from gen.probe import fixed_text

    flat = lambda xs: [x for lp in xs for x in lp]  # noqa: E731
    return {"probe": measures(flat(served), flat(base), ref, tol),
            "fixed": measures(served[0], base[0], fixed_text(ref), tol)}


def time_checks(pool, lora, seqs: list[list[int]], repeat: int) -> dict:
    """Seconds of the engine calls each design makes, interleaved `repeat` times on the same engine: two calls over
    the whole probe (adapter, base) vs one over the whole probe (adapter) and one over the fixed text (base)."""
    import ray

    actor = pool.actors[0]
    two, one = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ray.get(actor.probe_logprobs.remote(seqs, lora))
        ray.get(actor.probe_logprobs.remote(seqs, None))
        two.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get(actor.probe_logprobs.remote(seqs, lora))
        ray.get(actor.probe_logprobs.remote(seqs[:1], None))
        one.append(time.perf_counter() - t0)
    return {"two_calls_s": two, "one_call_s": one}


def run_dtype(dtype: str, a, model_path: str, ref: dict, tmp: Path) -> dict:
    import ray

    from eval.run import merge_adapter
    from gen.engine import EngineConfig, EnginePool
    from gen.probe import fit, probe_for, sequences, tolerance

    tol = tolerance(dtype)
    ecfg = EngineConfig(model=a.model, dtype=dtype, max_model_len=1024, cpu_kv_cache_gib=1.0)
    ref = fit(ref, ecfg.max_model_len)
    seqs = sequences(ref)
    out: dict = {"tolerance": tol}
    t0 = time.perf_counter()
    pool = EnginePool(ecfg, model_path, use_gpu=False)
    out["start_s"] = time.perf_counter() - t0
    try:
        base = ray.get(pool.actors[0].probe_logprobs.remote(seqs, None))
        for case in CASES:
            lora = pool.load_adapter(derived_adapter(a.adapter, case, tmp / f"{dtype}-{case}"), name_prefix=case)
            out[case] = both(ray.get(pool.actors[0].probe_logprobs.remote(seqs, lora)), base, ref, tol)
            if case != "right":  # (right: timed below) the check on this case as eval runs it, on its own probe
                t1 = time.perf_counter()
                try:
                    check = pool.verify_adapter(lora, ref)
                    out[case]["eval"] = {"verdict": "pass", "tokens": check["tokens"]}
                except ValueError as e:
                    out[case]["eval"] = {"verdict": f"refused: {str(e).split(': ', 1)[-1]}",
                                         "tokens": len(probe_for(ref, dtype)["adapter_logprobs"])}
                out[case]["eval"]["s"] = time.perf_counter() - t1
            if case == "right":  # the check as eval runs it (the probe this dtype needs) beside the whole probe,
                for _ in range(a.repeat):  # interleaved; then each design's calls, interleaved
                    for full in (False, True):  # timed whatever it decides: a refusal costs the same calls
                        key = "check_full" if full else "check"
                        t1 = time.perf_counter()
                        try:
                            check = pool.verify_adapter(lora, ref, full_probe=full)
                            out[f"{key}_tokens"], out[f"{key}_verdict"] = check["tokens"], "pass"
                        except ValueError as e:
                            probe = ref if full else probe_for(ref, dtype)
                            out[f"{key}_tokens"] = len(probe["adapter_logprobs"])
                            out[f"{key}_verdict"] = f"refused: {str(e).split(': ', 1)[-1]}"
                        out.setdefault(f"{key}_s", []).append(time.perf_counter() - t1)
                out["timing"] = time_checks(pool, lora, seqs, a.repeat)
            pool.unload_adapter(lora)
        if a.merged:
            for case in (CASES if a.merged_cases else ("right",)):
                src = a.adapter if case == "right" else derived_adapter(a.adapter, case, tmp / f"{dtype}-m-{case}")
                merged = merge_adapter(model_path, src)
                mpool = EnginePool(replace(ecfg, model=merged, enable_lora=False), merged, use_gpu=False)
                try:
                    if case == "right":
                        out["merged"] = both(ray.get(mpool.actors[0].probe_logprobs.remote(seqs, None)), base, ref,
                                             tol)
                    # the check as eval runs it on this dtype's CPU engines in merged mode (verify_merged), timed
                    # from the merged engine's first call on: `repeat` times for the adapter as trained
                    for _ in range(a.repeat if case == "right" else 1):
                        t1 = time.perf_counter()
                        try:
                            check = mpool.verify_merged(ref, pool)
                            rec = {"verdict": "pass", "tokens": check["tokens"], "design": check["design"],
                                   "res_eff": check["residual_l2"] / check["effect_l2"], "beta": check["beta"],
                                   **({"widened_from": check["widened_from"]} if check.get("widened") else {})}
                        except ValueError as e:
                            rec = {"verdict": f"refused: {str(e).split(': ', 1)[-1]}",
                                   "tokens": len(probe_for(ref, dtype)["adapter_logprobs"])}
                        rec["s"] = time.perf_counter() - t1
                        out.setdefault("merged_checks", {}).setdefault(case, []).append(rec)
                finally:
                    mpool.shutdown()
                    if case != "right":  # a derived adapter's merged weights are this bench's alone
                        import shutil

                        shutil.rmtree(merged, ignore_errors=True)
    finally:
        pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapter", required=True, help="a trained adapter folder (train/'s output)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-merged", dest="merged", action="store_false", help="skip the merged-engine case")
    ap.add_argument("--merged-cases", action="store_true",
                    help="also merge each wrong case (noop, half, double, other) and check it as eval does")
    ap.add_argument("--pairs", default="", help="pairs folder for an adapter whose record lacks training texts")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds of each design's engine calls")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.pairs and not os.path.isfile(os.path.join(a.pairs, "pairs.parquet")):
        sys.exit(f"--pairs {a.pairs!r}: no pairs.parquet there")
    if not os.path.isfile(os.path.join(a.adapter, "adapter_model.safetensors")):
        sys.exit(f"--adapter {a.adapter!r}: no adapter_model.safetensors there")

    from gen.engine import ensure_ray
    from gen.model_source import resolve_model
    from gen.probe import sequences

    model_path = resolve_model(a.model)
    ref = check_reference(a, model_path)
    ensure_ray()
    seqs = sequences(ref)
    res: dict = {"adapter": a.adapter, "sequences": len(seqs), "tokens": len(ref["adapter_logprobs"]),
                 "fixed_tokens": len(seqs[0]) - 1}
    with tempfile.TemporaryDirectory() as d:
        for dtype in a.dtypes:
            res[dtype] = run_dtype(dtype, a, model_path, ref, Path(d))
    print(f"\n{a.adapter}: probe {res['sequences']} texts, {res['tokens']} tokens (fixed text {res['fixed_tokens']}); "
          f"effect = |PEFT adapter - PEFT base|, noise = sqrt2 |engine base - PEFT base|, L2")
    print(f"{'dtype':<9}{'served':<8}{'probe':<7}{'effect':>9}{'noise':>9}{'eff/noise':>10}{'res/eff':>9}{'beta':>8}"
          f"{'max|d|':>9}  two-call verdict | one call: {'res/eff':>7}{'beta':>7}  verdict")
    for dtype in a.dtypes:
        for case in (*CASES, "merged"):
            for probe in ("probe", "fixed"):
                m = res[dtype].get(case, {}).get(probe)
                if m is None:
                    continue
                print(f"{dtype:<9}{case:<8}{probe:<7}{m['effect']:>9.3f}{m['noise']:>9.3g}"
                      f"{m['effect'] / max(m['noise'], 1e-30):>10.1f}{m['residual'] / max(m['effect'], 1e-30):>9.3f}"
                      f"{m['beta']:>8.3f}{m['max_abs_diff']:>9.4f}  {m['verdict'][:60]:<60} | "
                      f"{m['direct_residual'] / max(m['effect'], 1e-30):>7.3f}{m['direct_beta']:>7.3f}  "
                      f"{m['direct_verdict'][-60:]}")
        t = res[dtype]["timing"]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        r = res[dtype]
        print(f"{dtype}: the check as eval runs it (verify_adapter, right, {r['check_tokens']} tokens) "
              f"{' '.join(f'{x:.2f}' for x in r['check_s'])} s; on the whole probe ({r['check_full_tokens']} tokens) "
              f"{' '.join(f'{x:.2f}' for x in r['check_full_s'])} s (median ratio "
              f"{med(r['check_full_s']) / med(r['check_s']):.2f}x)")
        for case in CASES[1:]:
            e = r[case]["eval"]
            print(f"{dtype}: {case} as eval checks it ({e['tokens']} tokens, {e['s']:.2f} s): {e['verdict'][:90]}")
        for key in ("check", "check_full"):
            if r[f"{key}_verdict"] != "pass":
                print(f"{dtype}: {'whole probe' if key == 'check_full' else 'as eval runs it'}: {r[f'{key}_verdict']}")
        for case, recs in r.get("merged_checks", {}).items():
            for i, c in enumerate(recs):
                how = (f"{c['design']}, residual/effect {c['res_eff']:.3f}, beta {c['beta']:.3f}"
                       + (f", widened from {c['widened_from']}" if "widened_from" in c else "")
                       if c["verdict"] == "pass" else c["verdict"][:90])
                print(f"{dtype}: merged {case} as eval checks it (verify_merged, {c['tokens']} tokens, "
                      f"{'first call of its engine, ' if i == 0 else ''}{c['s']:.2f} s): {c['verdict'][:4]}; {how}")
        print(f"{dtype}: engine start "
              f"{res[dtype]['start_s']:.1f} s; engine calls, {a.repeat} interleaved rounds: two-call design "
              f"{' '.join(f'{x:.2f}' for x in t['two_calls_s'])} s, one-call "
              f"{' '.join(f'{x:.2f}' for x in t['one_call_s'])} s (median ratio "
              f"{med(t['two_calls_s']) / med(t['one_call_s']):.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
