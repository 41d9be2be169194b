"""Why a bf16 LoRA path serves less of an adapter than merged bf16 weights do: a numerical model of one layer.

    .venv/bin/python bench/bf16_lora_rounding.py

LoRA path (vLLM's, on CPU): y = bf16(x @ W), then y += bf16(x @ A^T @ B^T) in the bf16 output tensor, so the sum is
rounded again and the part of the adapter's product below half a bf16 ulp of y is lost. Merged: y = bf16(x @
bf16(W + dW)), one rounding of the weights. Prints the adapter's effect as served, projected on the exact one
(beta: 1 = served as trained), for products of several sizes relative to the layer's output. Deterministic
(seeded), seconds on CPU; the engine-level numbers are in docs/benchmarks.md ("bf16 engines: a short probe").
"""

from __future__ import annotations

import torch


def beta(served: torch.Tensor, base: torch.Tensor, exact: torch.Tensor) -> float:
    d, t = (served.float() - base.float()).flatten(), exact.flatten()
    return float(d @ t / (t @ t))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 896, generator=g).bfloat16().float()  # activations, as a bf16 engine holds them
    w = torch.randn(896, 896, generator=g) * 0.03  # float32 weights (the built-in model is dequantized to float32)
    base = (x @ w.bfloat16().float().T).bfloat16()
    print(f"{'|dW x| / |W x|':>16}  {'beta LoRA path':>14}  {'beta merged':>11}")
    for rel in (3e-4, 1e-3, 3e-3, 1e-2):
        dw = torch.randn(896, 896, generator=g) * 0.03 * rel
        exact = x @ dw.T
        lora = (base.float() + exact.bfloat16().float()).bfloat16()
        merged = (x @ (w + dw).bfloat16().float().T).bfloat16()
        print(f"{float(exact.norm() / (x @ w.T).norm()):>16.1e}  {beta(lora, base, exact):>14.3f}  "
              f"{beta(merged, base, exact):>11.3f}")


if __name__ == "__main__":
    main()
