"""Where a DPO training process's resident memory goes under jemalloc: live bytes vs pages jemalloc keeps.

Runs `steps` DPO optimizer steps (the experiment's settings: 1 x 4, no checkpointing, max_length 512, bf16 autocast
where the CPU has it, lr 1e-4) on 64 synthetic pairs of varied lengths (prompt 40-220 tokens, completions 30-290,
seeded) and prints, after each step, the process RSS and jemalloc's stats.allocated / active / resident / retained.
resident - active = freed pages jemalloc keeps (decay off never gives them back). Must start under jemalloc:

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \\
    TQDM_DISABLE=1 .venv/bin/python bench/dpo_malloc.py --steps 7 [--pad-to-multiple-of 64]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def varied_pairs(tok, model_name: str, n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def clip(text: str, tokens: int) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:tokens])

    rows = []
    for i in range(n):
        doc = f'def f{i}(xs: list[int]) -> int:\n    """Return the sum of the even numbers in xs."""\n'
        ok = "".join(f"    total_{j} = sum(x for x in xs if x % 2 == 0)\n" for j in range(200))
        bad = "".join(f"    total_{j} = sum(x for x in xs if x % 2 == 1)\n" for j in range(200))
        rows.append({"prompt": [{"role": "user", "content": clip(doc + "# complete this function\n" * 100,
                                                                  rng.randint(40, 220))}],
                     "chosen": [{"role": "assistant", "content": clip(ok, rng.randint(30, 290))}],
                     "rejected": [{"role": "assistant", "content": clip(bad, rng.randint(30, 290))}],
                     "model": model_name, "problem_id": f"p{i}"})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--pad-to-multiple-of", type=int, default=0, help="pad every batch to a multiple of this (0: off)")
    a = p.parse_args()
    if a.steps < 1 or a.pad_to_multiple_of < 0:
        p.error(f"--steps={a.steps} must be >= 1 and --pad-to-multiple-of={a.pad_to_multiple_of} >= 0")

    import pyarrow as pa
    from transformers import AutoTokenizer, TrainerCallback

    from train.allocator import jemalloc_mallctl
    from train.dpo import TrainConfig, base_model, build_trainer

    mallctl = jemalloc_mallctl()
    if mallctl is None:
        print("dpo_malloc: jemalloc is not loaded; start it with LD_PRELOAD (see the docstring)", file=sys.stderr)
        return 2

    def stat(name: bytes) -> float:
        epoch = ctypes.c_uint64(1)
        mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))  # refresh the stats
        v, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        return v.value / 2**30 if mallctl(name, ctypes.byref(v), ctypes.byref(size), None, 0) == 0 else float("nan")

    def rss() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    load, ident = base_model(a.model)
    table = pa.Table.from_pylist(varied_pairs(AutoTokenizer.from_pretrained(load), ident["name"]))
    cfg = TrainConfig(pairs=("synthetic",), out="unused", model=a.model, max_steps=a.steps, batch_size=1,
                      grad_accum=4, max_length=512, gradient_checkpointing=False, learning_rate=1e-4)
    last = [time.perf_counter()]

    class Stats(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            print(f"step {state.global_step} {now - last[0]:.1f}s  rss {rss():.2f} GiB  jemalloc: allocated "
                  f"{stat(b'stats.allocated'):.2f} active {stat(b'stats.active'):.2f} resident "
                  f"{stat(b'stats.resident'):.2f} retained {stat(b'stats.retained'):.2f}", flush=True)
            last[0] = now

    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(cfg, table, load, Path(work), callbacks=[Stats()])
        if a.pad_to_multiple_of:
            trainer.data_collator.pad_to_multiple_of = a.pad_to_multiple_of
        trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
