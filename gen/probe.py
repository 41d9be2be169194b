"""The hot-load check: is the adapter an engine serves the adapter that was trained?

vLLM can serve an adapter that silently does nothing (vllm#34186, lm-eval-harness#2432) or stale weights under a
reused name (vllm#42125). So after loading, every engine scores the probe (vLLM prompt log-probs) under the adapter
and under the base, and the scores are compared with a reference computed by PEFT from the adapter's weights: by
train/ right after training (recorded in train_manifest.json, so a file corrupted or swapped since then is caught),
or, for an adapter without that record, by PEFT here from its files. The engine's adapter log-probs must match the
reference within a tolerance fitted to the engine's dtype, and its effect (adapter minus base) must reproduce
PEFT's, clear of the engine's own rounding noise.

The probe is a list of token sequences: a fixed code text, and (recorded by train/) the chat texts of the adapter's
first training pairs, prompt + chosen and prompt + rejected. An adapter moves the texts it was trained on far more
than other text: run 2's balanced adapter moved the fixed 50-token probe by L2 0.31, within a bf16 engine's noise
(0.34), and its training texts by 15.1 against a noise of 1.8 (bench/hotload_power.py, docs/benchmarks.md). So a
bf16 engine can vouch for a trained adapter on its training texts, where the fixed probe alone cannot. Each engine
dtype scores only the part it needs (probe_for): float32 the fixed text alone where that resolves the adapter, bf16
the fixed text and the shortest training-text prefix that does; the whole probe otherwise, or when the engine turns
out noisier than expected (gen.engine._widen). On the short probe the one-call check (compare_direct: the served
log-probs against PEFT's adapter ones, the base on the fixed text only) decides a pass first, the paired one
(compare) anything else (gen.engine.EnginePool._verify).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

# Code-like text every tokenizer splits into a few dozen tokens; LoRA on attention and MLP moves all of them.
PROBE_TEXT = ("def running_max(xs):\n    \"\"\"Running maximum of a list.\"\"\"\n    out, best = [], None\n"
              "    for x in xs:\n        best = x if best is None or x > best else best\n        out.append(best)\n"
              "    return out\n")
# Training pairs whose chosen and rejected texts join the probe (4 pairs: 8 sequences), each cut to this many tokens
# (the log-prob of token i depends on tokens < i only, so a cut sequence keeps its first log-probs exactly).
PROBE_PAIRS = 4
PROBE_MAX_TOKENS = 512
# Largest |engine - PEFT| token log-prob difference accepted, per engine dtype. float32: vLLM-CPU vs HF on the same
# weights differ by reduction order only (measured max 2e-5 on the tiny test model, 1e-4 headroom x ~10);
# bfloat16/float16: 8-bit/11-bit mantissas put single-token differences near 0.05-0.1 on a 0.5B model.
TOLERANCE = {"float32": 2e-3, "bfloat16": 0.25, "float16": 0.1}
# The engine's effect projected on PEFT's, beta = <d_engine, d_PEFT> / |d_PEFT|^2, must lie within this of 1 (the
# adapter as trained). Measured on run 2's adapters' training texts: bf16 engines 0.915 (systematic attenuation),
# float32 1.000; the wrong adapters at 0 (a no-op, another adapter), 0.32-0.47 (B x 0.5), 1.88-1.91 (B x 2).
BETA_BAND = 0.25


# The probe each engine dtype scores (probe_for). The training texts are there for bf16, whose rounding noise on the
# fixed text (L2 ~0.2-0.3 over its 50 tokens, measured) can exceed a lightly trained adapter's effect on it (0.049 on
# the demo's, 0.307 on run 2's). A float32 engine matches PEFT to <= 2e-5 per token (measured, 0.5B and the tiny
# model): noise <= sqrt(2 x 50) x 2e-5 = 2e-4 L2 on the fixed text. Where the adapter moves the fixed text by at
# least FIXED_TEXT_EFFECT_MIN (50x that noise; compare() still asks 4x of the noise it measures), the fixed text alone
# decides, in 50 tokens instead of ~3,300 (every wrong adapter of bench/hotload_power.py was refused on it in float32);
# below, or in another dtype, the whole probe.
FIXED_TEXT_EFFECT_MIN = {"float32": 1e-2}
# A bf16 engine's noise per scored token, as measure() counts it (sqrt 2 for the two noisy sides): L2 0.34 over the
# fixed text's 49 tokens (0.049 a token) and 1.8 over 3,312 training-text tokens (0.031) on run 2's adapter, so 0.05
# is the larger of the two. compare()'s power test (effect > 4x noise) depends on the effect's density, not on the
# probe's length: with noise ~ sigma x sqrt(tokens), a text the adapter moves by more than 4 sigma a token (RMS) passes
# it however short. So a bf16 engine scores the fixed text and the shortest prefix of one training text whose
# effect, by PEFT's numbers, clears SHORT_PROBE_MARGIN x this prior (twice the test's 4x: an engine twice as noisy
# still passes); where no prefix does, the whole probe. A check refused on the short probe for want of power alone
# is redone on the whole probe, as for float32's fixed text (gen.engine._widen).
SHORT_PROBE_NOISE = {"bfloat16": 0.05}
SHORT_PROBE_MARGIN = 8.0
# Keys probe_for derives for a shortened probe: dropped from a stored record before it is used (gen.engine).
DERIVED_KEYS = ("pair_texts_skipped", "short_probe")


def tolerance(dtype: str) -> float:
    if dtype not in TOLERANCE:
        raise ValueError(f"no hot-load tolerance for engine dtype {dtype!r}; known: {sorted(TOLERANCE)}")
    return TOLERANCE[dtype]


def sequences(ref: dict[str, Any]) -> list[list[int]]:
    """The probe's token sequences (a record written before probes had several holds one, as `token_ids`)."""
    seqs = ref.get("sequences")
    return [list(s) for s in seqs] if seqs else [list(ref["token_ids"])]


def validate(ref: Any, where: str) -> dict[str, Any]:
    """`ref` if it is a well-formed probe record, else ValueError naming `where` and the field: a record that cannot
    be read is refused, never replaced by one computed now (that would vouch for files changed since training)."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{where}: probe record field {field!r} {why}; the hot-load check cannot use it (retrain, "
                          f"or remove the record to have PEFT recompute it from the adapter's files)")

    if not isinstance(ref, dict):
        raise bad("probe", f"is a {type(ref).__name__}, not an object")
    seqs = ref.get("sequences", ref.get("token_ids") and [ref.get("token_ids")])
    field = "sequences" if "sequences" in ref else "token_ids"
    if not isinstance(seqs, list) or not seqs or not all(
            isinstance(s, list) and len(s) >= 2 and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in s) for s in seqs):
        raise bad(field, "is missing or not a list of token-id lists (each of 2 or more ids)")
    for key in ("adapter_logprobs", "base_logprobs"):
        xs = ref.get(key)
        if not isinstance(xs, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) and x <= 0 for x in xs):
            raise bad(key, "is missing or not a list of finite log-probs (<= 0)")
    return ref


def fit(ref: dict[str, Any], max_len: int) -> dict[str, Any]:
    """The reference cut so that every sequence fits an engine of `max_len` tokens (one more is generated)."""
    seqs, adapter, base = sequences(ref), ref["adapter_logprobs"], ref["base_logprobs"]
    want = sum(len(s) - 1 for s in seqs)
    if len(adapter) != want or len(base) != want:
        raise ValueError(f"hot-load reference is malformed: its {len(seqs)} probe sequence(s) have {want} scored "
                         f"tokens, its log-probs {len(adapter)} (adapter) and {len(base)} (base)")
    out_seqs, out_a, out_b, at = [], [], [], 0
    for s in seqs:
        keep = min(len(s), max_len - 1)
        out_seqs.append(s[:keep])
        out_a += adapter[at: at + keep - 1]
        out_b += base[at: at + keep - 1]
        at += len(s) - 1
    return {**ref, "sequences": out_seqs, "adapter_logprobs": out_a, "base_logprobs": out_b}


def probe_for(ref: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The part of a (fitted) reference an engine of `dtype` scores: in float32 its fixed text alone where that
    resolves the adapter (FIXED_TEXT_EFFECT_MIN); in bf16 the fixed text and the shortest training-text prefix that
    does against the dtype's noise prior (SHORT_PROBE_NOISE); else all of it. Decided on PEFT's numbers only, before
    any engine call; the check itself then measures the engine's noise as always (and refuses an effect within 4x of
    it)."""
    if len(sequences(ref)) == 1:
        return ref
    floor = FIXED_TEXT_EFFECT_MIN.get(dtype)
    if floor is not None:
        fixed = fixed_text(ref)
        if _l2([a - b for a, b in zip(fixed["adapter_logprobs"], fixed["base_logprobs"])]) < floor:
            return ref
        return fixed
    sigma = SHORT_PROBE_NOISE.get(dtype)
    return ref if sigma is None else short_probe(ref, SHORT_PROBE_MARGIN * sigma)


def short_probe(ref: dict[str, Any], density: float) -> dict[str, Any]:
    """The fixed text plus the shortest prefix of one training text (the first of the shortest) over which the
    adapter's effect (PEFT) reaches `density` x sqrt(tokens scored); the fixed text alone if it does; `ref` itself
    where nothing shorter does. A prefix keeps its log-probs exactly (token i depends on tokens < i only)."""
    seqs, adapter, base = sequences(ref), ref["adapter_logprobs"], ref["base_logprobs"]
    d2 = [(a - b) ** 2 for a, b in zip(adapter, base)]
    k0 = len(seqs[0]) - 1
    need = density * density
    fixed2 = sum(d2[:k0])
    if fixed2 >= need * k0:
        return fixed_text(ref)
    best = None  # (scored tokens of the prefix, text index, offset of its log-probs)
    at = k0
    for j, s in enumerate(seqs[1:], start=1):
        total = fixed2
        for n in range(1, len(s)):
            if best is not None and n >= best[0]:
                break
            total += d2[at + n - 1]
            if total >= need * (k0 + n):
                best = (n, j, at)
                break
        at += len(s) - 1
    if best is None or k0 + best[0] >= len(adapter):
        return ref
    n, j, at = best
    return {**ref, "sequences": [list(seqs[0]), list(seqs[j][:n + 1])], "pair_texts": 1,
            "pair_texts_skipped": len(seqs) - 2, "short_probe": {"text": j, "tokens": n, "of": len(seqs[j]) - 1},
            "adapter_logprobs": adapter[:k0] + adapter[at:at + n], "base_logprobs": base[:k0] + base[at:at + n]}


def fixed_text(ref: dict[str, Any]) -> dict[str, Any]:
    """The reference's first sequence (the fixed text) alone, with its own log-probs."""
    seqs = sequences(ref)
    k = len(seqs[0]) - 1
    return {**ref, "sequences": [list(seqs[0])], "pair_texts": 0, "pair_texts_skipped": len(seqs) - 1,
            "adapter_logprobs": ref["adapter_logprobs"][:k], "base_logprobs": ref["base_logprobs"][:k]}


def token_logprobs(model, token_ids: Sequence[int]) -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1 under an HF causal LM (PEFT or not), in float64 lists."""
    import torch

    ids = torch.tensor([list(token_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp[torch.arange(len(token_ids) - 1, device=ids.device), ids[0, 1:]].double().tolist()


def pair_sequences(tokenizer, rows: Sequence[dict[str, Any]], pairs: int = PROBE_PAIRS,
                   max_tokens: int = PROBE_MAX_TOKENS) -> list[list[int]]:
    """Token ids of prompt + chosen and prompt + rejected of the first `pairs` rows (message lists through the chat
    template, strings as they are), each cut to `max_tokens`."""
    out = []
    for r in list(rows)[:pairs]:
        for side in ("chosen", "rejected"):
            if isinstance(r["prompt"], str):
                ids = tokenizer(r["prompt"] + r[side], add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(list(r["prompt"]) + list(r[side]), tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in some versions
            if len(ids) >= 2:
                out.append(list(ids)[:max_tokens])
    return out


def reference(model, tokenizer, pair_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The record train/ writes: the probe's sequences (the fixed text, then `pair_rows`' texts) and PEFT's log-probs
    of them with the adapter on and off, concatenated over the sequences."""
    seqs = [tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]] + pair_sequences(tokenizer, pair_rows)
    was_training = model.training
    model.eval()
    try:
        adapter = [x for s in seqs for x in token_logprobs(model, s)]
        with model.disable_adapter():
            base = [x for s in seqs for x in token_logprobs(model, s)]
    finally:
        model.train(was_training)
    return {"text": PROBE_TEXT, "sequences": [list(s) for s in seqs], "pair_texts": len(seqs) - 1,
            "adapter_logprobs": adapter, "base_logprobs": base}


def reference_from_files(model_path: str, adapter_path: str,
                         pair_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The same record computed now by PEFT from the adapter's files (for adapters trained elsewhere)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path)
    return reference(model, tok, pair_rows)


def _l2(xs: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


def measure(engine_adapter: Sequence[float], engine_base: Sequence[float], ref: dict[str, Any]) -> dict[str, float]:
    """What compare() decides on, as numbers (L2 over all the probe's tokens; max_* over the fixed text's)."""
    want, want_base = ref["adapter_logprobs"], ref["base_logprobs"]
    d_ref = [a - b for a, b in zip(want, want_base)]
    d_eng = [a - b for a, b in zip(engine_adapter, engine_base)]
    effect2 = sum(x * x for x in d_ref)
    k = len(sequences(ref)[0]) - 1
    return {
        "effect": _l2(d_ref),  # what the adapter does to the probe (PEFT, float32)
        "engine_effect": _l2(d_eng),  # what it does in this engine
        "residual": _l2([a - b for a, b in zip(d_eng, d_ref)]),  # how far the engine's effect is from PEFT's
        # the engine's own rounding on the probe (sqrt 2 for the two noisy sides): the effect must stand clear of it
        "noise": math.sqrt(2) * _l2([a - b for a, b in zip(engine_base, want_base)]),
        # token-wise, on the fixed text (the tolerances are fitted to it; over thousands of training-text tokens a
        # bf16 engine's largest single-token difference reached 0.78 for the adapter as trained)
        "max_abs_diff": max(abs(a - b) for a, b in zip(engine_adapter[:k], want[:k])),
        "max_abs_diff_base": max(abs(a - b) for a, b in zip(engine_base[:k], want_base[:k])),
        "max_effect": max(abs(x) for x in d_ref[:k]),  # how far the adapter moves a fixed-text token (PEFT)
        # the engine's effect projected on PEFT's: 1 as trained, 0 a no-op or another adapter, 0.5 / 2 B x 0.5 / x 2
        "beta": sum(a * b for a, b in zip(d_eng, d_ref)) / max(effect2, 1e-30),
    }


def within_noise(m: dict[str, float]) -> bool:
    """compare()'s power test on measure()'s numbers: the adapter's effect is not 4x clear of the engine's noise."""
    return m["effect"] <= max(4 * m["noise"], 1e-9)


def check_margins(served: Sequence[Sequence[float]], base: Sequence[Sequence[float]],
                  ref: dict[str, Any]) -> dict[str, float]:
    """The hot-load check's numbers for the report, of the engine nearest to refusal: the largest token difference
    from PEFT's adapter log-probs, and the adapter's effect, the engine's residual from it and its noise (L2)."""
    ms = [measure(lp, blp, ref) for lp, blp in zip(served, base)]
    worst = max(ms, key=lambda m: m["residual"] / max(m["effect"], 1e-30))
    return {"max_abs_diff": max(m["max_abs_diff"] for m in ms), "effect_l2": worst["effect"],
            "residual_l2": worst["residual"], "noise_l2": worst["noise"],
            "beta": max((m["beta"] for m in ms), key=lambda b: abs(b - 1))}


def _other_base(diff: float, tol: float) -> str:
    return (f"engine base log-probs differ from PEFT's by up to {diff:.3g} (tolerance {tol:g}): the engine serves other "
            f"base weights")


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
    in float32 (tol 2e-3), (4) in bf16. (5) The engine's effect projected on PEFT's, beta, lies within BETA_BAND of
    1: a scaled adapter (an earlier checkpoint, a lost lora_alpha) with little else changed can pass (4) at 0.6 or
    1.4, not (5). The token-wise tests (1) and (3) run on the fixed text, the others on every token of the probe.
    """
    want = ref["adapter_logprobs"]
    if len(engine_adapter) != len(want) or len(engine_base) != len(want):
        return f"probe length differs: engine {len(engine_adapter)} tokens, reference {len(want)}"
    m = measure(engine_adapter, engine_base, ref)
    effect, residual, noise = m["effect"], m["residual"], m["noise"]
    if m["max_abs_diff_base"] > tol:
        return _other_base(m["max_abs_diff_base"], tol)
    if within_noise(m):
        return (f"the adapter's effect on the probe (L2 {effect:.3g} over {len(want)} tokens; PEFT) is within 4x this "
                f"engine's numerical noise ({noise:.3g}): it would be indistinguishable from the base; a float32 "
                f"engine resolves smaller effects" + ("" if ref.get("pair_texts") else
                "; the reference holds the fixed probe only (no training texts: an adapter trained elsewhere or "
                "by a version before probes had them), on which bf16 engines resolve little"))
    if residual >= effect / 2 and m["engine_effect"] < effect / 2:
        return (f"the engine's log-probs with and without the adapter differ by L2 {m['engine_effect']:.3g}, PEFT's "
                f"by {effect:.3g} (noise {noise:.3g}): the engine serves a no-op")
    if m["max_abs_diff"] > tol:
        return (f"engine log-probs under the adapter differ from PEFT's by up to {m['max_abs_diff']:.3g} (tolerance "
                f"{tol:g}; the adapter moves them by up to {m['max_effect']:.3g}): the engine serves other weights")
    if residual >= effect / 2:
        return (f"the engine's adapter effect differs from PEFT's by L2 {residual:.3g} against an effect of "
                f"{effect:.3g} (noise {noise:.3g}): the engine serves other weights")
    if abs(m["beta"] - 1) > BETA_BAND:
        return (f"the engine's adapter effect is {m['beta']:.3g} x PEFT's along it (accepted 1 +- {BETA_BAND:g}; "
                f"effect L2 {effect:.3g}, noise {noise:.3g}): the engine serves other weights (a scaled adapter)")
    return None


# The one-call check: the engine's adapter log-probs must lie within RESIDUAL_MAX x the adapter's effect of PEFT's,
# over every probe token: |e_adapter - PEFT adapter| < RESIDUAL_MAX |PEFT adapter - PEFT base|. By Cauchy-Schwarz
# that bounds the projection beta = <e_adapter - PEFT base, d_PEFT> / |d_PEFT|^2 within 1 +- RESIDUAL_MAX, so a
# no-op (beta 0), a half- or double-scaled adapter and another adapter's weights cannot pass, whatever the noise.
RESIDUAL_MAX = 0.25


def measure_direct(engine_adapter: Sequence[float], engine_base_fixed: Sequence[float],
                   ref: dict[str, Any]) -> dict[str, float]:
    """What compare_direct() decides on: the engine's adapter log-probs on every probe token, its base log-probs on
    the fixed text only (the base-weights test)."""
    want, want_base = ref["adapter_logprobs"], ref["base_logprobs"]
    d_ref = [a - b for a, b in zip(want, want_base)]
    effect2 = sum(x * x for x in d_ref)
    k = len(sequences(ref)[0]) - 1
    return {
        "effect": _l2(d_ref),
        "engine_effect": _l2([a - b for a, b in zip(engine_adapter, want_base)]),
        "residual": _l2([a - b for a, b in zip(engine_adapter, want)]),
        "beta": sum((a - b) * d for a, b, d in zip(engine_adapter, want_base, d_ref)) / max(effect2, 1e-30),
        "max_abs_diff": max(abs(a - b) for a, b in zip(engine_adapter[:k], want[:k])),
        "max_abs_diff_base": max(abs(a - b) for a, b in zip(engine_base_fixed[:k], want_base[:k])),
        "max_effect": max(abs(x) for x in d_ref[:k]),
    }


def compare_direct(engine_adapter: Sequence[float], engine_base_fixed: Sequence[float], ref: dict[str, Any],
                   tol: float) -> str | None:
    """None when the engine serves the reference adapter; else why not. One call of the engine under the adapter
    over the whole probe, and one of its base over the fixed text."""
    want = ref["adapter_logprobs"]
    k = len(sequences(ref)[0]) - 1
    if len(engine_adapter) != len(want) or len(engine_base_fixed) < k:
        return f"probe length differs: engine {len(engine_adapter)} tokens, reference {len(want)}"
    m = measure_direct(engine_adapter, engine_base_fixed, ref)
    effect, residual, beta = m["effect"], m["residual"], m["beta"]
    if m["max_abs_diff_base"] > tol:
        return _other_base(m["max_abs_diff_base"], tol)
    if effect <= 1e-9:
        return "the adapter does not move the probe at all (PEFT): there is nothing to tell it from the base by"
    if m["max_abs_diff"] > tol:
        return (f"engine log-probs under the adapter differ from PEFT's by up to {m['max_abs_diff']:.3g} (tolerance "
                f"{tol:g}; the adapter moves them by up to {m['max_effect']:.3g}): the engine serves other weights")
    if residual >= RESIDUAL_MAX * effect:
        what = ("a no-op (the base, or an unrelated adapter)" if abs(beta) < RESIDUAL_MAX else
                "a scaled adapter" if abs(beta - 1) > RESIDUAL_MAX else "other weights")
        return (f"the engine's log-probs under the adapter are L2 {residual:.3g} from PEFT's, {residual / effect:.2f} "
                f"of the adapter's effect (L2 {effect:.3g} over {len(want)} tokens; accepted < {RESIDUAL_MAX:g}); "
                f"its effect is {beta:.3f} x PEFT's along it: the engine serves {what}"
                + ("" if ref.get("pair_texts") else "; the reference holds the fixed probe only (no training texts), "
                   "on which a bf16 engine's rounding alone exceeds a lightly trained adapter's effect"))
    return None


def check_margins_direct(served: Sequence[Sequence[float]], base_fixed: Sequence[Sequence[float]],
                         ref: dict[str, Any]) -> dict[str, Any]:
    """check_margins for a pass of the one-call check (compare_direct): the residual is the served log-probs' distance
    from PEFT's adapter ones (accepted < RESIDUAL_MAX of the effect), and no noise was measured over the probe (the
    base was scored on the fixed text only)."""
    ms = [measure_direct(lp, b, ref) for lp, b in zip(served, base_fixed)]
    worst = max(ms, key=lambda m: m["residual"] / max(m["effect"], 1e-30))
    return {"max_abs_diff": max(m["max_abs_diff"] for m in ms), "effect_l2": worst["effect"],
            "residual_l2": worst["residual"], "noise_l2": None, "residual_max": RESIDUAL_MAX,
            "beta": max((m["beta"] for m in ms), key=lambda b: abs(b - 1))}
