"""The hot-load check: is the adapter an engine serves the adapter that was trained?

vLLM can serve an adapter that silently does nothing (vllm#34186, lm-eval-harness#2432) or stale weights under a
reused name (vllm#42125). So after loading, every engine scores a fixed probe text under the adapter (vLLM prompt
log-probs) and under the base, and the scores are compared with a reference computed by PEFT from the adapter's
weights: by train/ right after training (recorded in train_manifest.json, so a file corrupted or swapped since then
is caught), or, for an adapter without that record, by PEFT here from its files. The engine's adapter log-probs
must match the reference within a tolerance fitted to the engine's dtype, and must differ from the base's by more
than that tolerance (an adapter that changes nothing on the probe is refused as a no-op).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

# Code-like text every tokenizer splits into a few dozen tokens; LoRA on attention and MLP moves all of them.
PROBE_TEXT = ("def running_max(xs):\n    \"\"\"Running maximum of a list.\"\"\"\n    out, best = [], None\n"
              "    for x in xs:\n        best = x if best is None or x > best else best\n        out.append(best)\n"
              "    return out\n")
# Largest |engine - PEFT| token log-prob difference accepted, per engine dtype. float32: vLLM-CPU vs HF on the same
# weights differ by reduction order only (measured max 2e-5 on the tiny test model, 1e-4 headroom x ~10);
# bfloat16/float16: 8-bit/11-bit mantissas put single-token differences near 0.05-0.1 on a 0.5B model.
TOLERANCE = {"float32": 2e-3, "bfloat16": 0.25, "float16": 0.1}


def tolerance(dtype: str) -> float:
    if dtype not in TOLERANCE:
        raise ValueError(f"no hot-load tolerance for engine dtype {dtype!r}; known: {sorted(TOLERANCE)}")
    return TOLERANCE[dtype]


def token_logprobs(model, token_ids: Sequence[int]) -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1 under an HF causal LM (PEFT or not), in float64 lists."""
    import torch

    ids = torch.tensor([list(token_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp[torch.arange(len(token_ids) - 1, device=ids.device), ids[0, 1:]].double().tolist()


def reference(model, tokenizer) -> dict[str, Any]:
    """The record train/ writes: the probe's token ids and PEFT's log-probs with the adapter on and off."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    was_training = model.training
    model.eval()
    try:
        adapter = token_logprobs(model, ids)
        with model.disable_adapter():
            base = token_logprobs(model, ids)
    finally:
        model.train(was_training)
    return {"text": PROBE_TEXT, "token_ids": list(ids), "adapter_logprobs": adapter, "base_logprobs": base}


def reference_from_files(model_path: str, adapter_path: str) -> dict[str, Any]:
    """The same record computed now by PEFT from the adapter's files (for adapters trained elsewhere)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path)
    return reference(model, tok)


def _l2(xs: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


def measure(engine_adapter: Sequence[float], engine_base: Sequence[float], ref: dict[str, Any]) -> dict[str, float]:
    """What compare() decides on, as numbers (L2 over the probe's tokens unless max_*)."""
    want, want_base = ref["adapter_logprobs"], ref["base_logprobs"]
    d_ref = [a - b for a, b in zip(want, want_base)]
    d_eng = [a - b for a, b in zip(engine_adapter, engine_base)]
    return {
        "effect": _l2(d_ref),  # what the adapter does to the probe (PEFT, float32)
        "engine_effect": _l2(d_eng),  # what it does in this engine
        "residual": _l2([a - b for a, b in zip(d_eng, d_ref)]),  # how far the engine's effect is from PEFT's
        # the engine's own rounding on the probe (sqrt 2 for the two noisy sides): the effect must stand clear of it
        "noise": math.sqrt(2) * _l2([a - b for a, b in zip(engine_base, want_base)]),
        "max_abs_diff": max(abs(a - b) for a, b in zip(engine_adapter, want)),
        "max_abs_diff_base": max(abs(a - b) for a, b in zip(engine_base, want_base)),
    }


def check_margins(served: Sequence[Sequence[float]], base: Sequence[Sequence[float]],
                  ref: dict[str, Any]) -> dict[str, float]:
    """The hot-load check's numbers for the report, of the engine nearest to refusal: the largest token difference
    from PEFT's adapter log-probs, and the adapter's effect, the engine's residual from it and its noise (L2)."""
    ms = [measure(lp, blp, ref) for lp, blp in zip(served, base)]
    worst = max(ms, key=lambda m: m["residual"] / max(m["effect"], 1e-30))
    return {"max_abs_diff": max(m["max_abs_diff"] for m in ms), "effect_l2": worst["effect"],
            "residual_l2": worst["residual"], "noise_l2": worst["noise"]}


def compare(engine_adapter: Sequence[float], engine_base: Sequence[float], ref: dict[str, Any],
            tol: float) -> str | None:
    """None when the engine serves the reference adapter; else why not (in words, with the numbers).

    (1) The engine's base log-probs match PEFT's base within `tol` (else it runs other base weights). (2) The
    adapter's effect on the probe, d_ref = PEFT adapter - PEFT base, stands clear of this engine's own numerical
    noise on it, measured now as e_base - PEFT base (sqrt 2 for the two noisy sides, x 4 for margin; L2 over
    tokens): a bf16 engine's per-token noise (~0.05-0.1 on a 0.5B model, measured) can exceed a lightly trained
    adapter's per-token effect, so the effect is compared as a whole, not token by token. Pairing the engine's two
    calls does not cancel that noise: any nonzero adapter re-rounds the whole forward pass, so in bf16 the engine's
    effect of a correct adapter with PEFT effect L2 0.05 was L2 0.23, as large as the noise (bench/hotload_power.py,
    docs/benchmarks.md). (3) Its adapter log-probs match PEFT's adapter ones within `tol`. (4) The engine's own
    effect d_eng = e_adapter - e_base reproduces d_ref: |d_eng - d_ref| < |d_ref| / 2. A served no-op has d_eng = 0
    (residual |d_ref|); other weights move other tokens; the right adapter leaves only noise. (3) is the tight test
    in float32 (tol 2e-3), (4) in bf16.
    """
    want = ref["adapter_logprobs"]
    if len(engine_adapter) != len(want) or len(engine_base) != len(want):
        return f"probe length differs: engine {len(engine_adapter)} tokens, reference {len(want)}"
    m = measure(engine_adapter, engine_base, ref)
    effect, residual, noise = m["effect"], m["residual"], m["noise"]
    if m["max_abs_diff_base"] > tol:
        return (f"engine base log-probs differ from PEFT's by up to {m['max_abs_diff_base']:.3g} (tolerance {tol:g}): "
                f"the engine serves other base weights")
    if effect <= max(4 * noise, 1e-9):
        return (f"the adapter's effect on the probe (L2 {effect:.3g} over {len(want)} tokens; PEFT) is within 4x this "
                f"engine's numerical noise ({noise:.3g}): it would be indistinguishable from the base; a float32 "
                f"engine resolves smaller effects")
    if residual >= effect / 2 and m["engine_effect"] < effect / 2:
        return (f"the engine's log-probs with and without the adapter differ by L2 {m['engine_effect']:.3g}, PEFT's "
                f"by {effect:.3g} (noise {noise:.3g}): the engine serves a no-op")
    if m["max_abs_diff"] > tol:
        d_max = max(abs(a - b) for a, b in zip(want, ref["base_logprobs"]))
        return (f"engine log-probs under the adapter differ from PEFT's by up to {m['max_abs_diff']:.3g} (tolerance "
                f"{tol:g}; the adapter moves them by up to {d_max:.3g}): the engine serves other weights")
    if residual >= effect / 2:
        return (f"the engine's adapter effect differs from PEFT's by L2 {residual:.3g} against an effect of "
                f"{effect:.3g} (noise {noise:.3g}): the engine serves other weights")
    return None
