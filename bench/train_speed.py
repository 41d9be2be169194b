"""DPO + LoRA training speed (pairs/s) and peak memory of train/ on the offline default model.

    .venv/bin/python bench/train_speed.py                         # default model, this machine's CPU or GPU
    .venv/bin/python bench/train_speed.py --max-length 256 --batch-size 2 --steps 4 --model default
    .venv/bin/python bench/train_speed.py --precision float32 bf16-autocast --variants defaults   # per precision
    .venv/bin/python bench/train_speed.py --pairs runs/demo/pairs/pairs.parquet --max-length 768 --shapes 2x2 1x4

--shapes compares micro-batch x gradient-accumulation shapes at the same pairs per optimizer step (the same pairs
in the same order: TRL's seeded sampler): a micro-batch is padded to its longest sequence, so with real pairs of
uneven length a smaller one pads less. --pairs takes real pairs (a pairs stage's pairs.parquet, its first rows)
instead of synthetic ones.

Each variant runs in its own process (so peak RSS is its own), for each --precision (default: what `auto` picks
here): train/'s defaults (gradient checkpointing on), then gradient checkpointing off, then precomputed reference
log-probs (--variants picks among defaults, no-gc, precompute). Synthetic code pairs are sized to fill
--max-length tokens. The first optimizer step (allocations, lazy init) is excluded from the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_pairs(n: int, model_name: str, tokenizer, max_length: int) -> list[dict]:
    """Code prompts and completions: prompt ~40% of max_length tokens, each completion ~60%."""
    rows = []
    for i in range(n):
        doc = f"def f{i}(xs: list[int]) -> int:\n    \"\"\"Return the sum of the even numbers in xs.\"\"\"\n"
        body_ok = "".join(f"    total_{j} = sum(x for x in xs if x % 2 == 0)\n" for j in range(200))
        body_bad = "".join(f"    total_{j} = sum(x for x in xs if x % 2 == 1)\n" for j in range(200))

        def clip(text: str, tokens: int) -> str:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
            return tokenizer.decode(ids)

        prompt = clip(doc + "# complete this function\n" * 100, int(0.4 * max_length) - 12)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": clip(body_ok, int(0.6 * max_length) - 8)}],
                "rejected": [{"role": "assistant", "content": clip(body_bad, int(0.6 * max_length) - 8)}],
                "model": model_name,
                "problem_id": f"p{i}",
            }
        )
    return rows


def run_variant(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from train.dpo import TrainConfig, base_model, build_trainer, training_precision

    load, ident = base_model(args.model)
    tok = AutoTokenizer.from_pretrained(load)
    per_step = args.batch_size * args.grad_accum
    n_pairs = per_step * args.steps
    if args.pairs:
        import pyarrow.parquet as pq

        table = pq.read_table(args.pairs)
        if table.num_rows < n_pairs:
            raise SystemExit(f"--pairs {args.pairs}: {table.num_rows} pairs, {n_pairs} needed for {args.steps} steps")
        table = table.slice(0, n_pairs)
    else:
        table = pa.Table.from_pylist(synthetic_pairs(n_pairs, ident["name"], tok, args.max_length))
    cfg = TrainConfig(
        pairs=("synthetic",), out="unused", model=args.model, max_steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, gradient_checkpointing=args.gc,
        precompute_ref_log_probs=args.precompute, learning_rate=args.learning_rate, precision=args.precision,
    )
    stamps: list[float] = []
    rss_gib: list[float] = []  # resident memory after each step: a caching malloc that keeps what it is given grows

    class StepClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            rss_gib.append(round(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                                 / (1 << 30), 2))

    faults0 = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, table, load, Path(work), callbacks=[StepClock()])
        t_setup = time.perf_counter() - t0  # includes the reference pass when precompute is on
        lengths = [
            len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset
        ]
        trainer.train()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    steady = (len(stamps) - 1) * per_step / (stamps[-1] - stamps[0])
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # ru_maxrss is KiB on Linux
    gpu_peak = torch.cuda.max_memory_allocated() / (1 << 30) if torch.cuda.is_available() else None
    return {
        "model": ident["name"], "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "max_length": args.max_length, "mean_seq_tokens": round(sum(lengths) / len(lengths), 1),
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "pairs": args.pairs or "synthetic",
        "steps": args.steps, "gradient_checkpointing": args.gc,
        "precompute_ref_log_probs": args.precompute, "precision": training_precision(cfg)[0],
        "setup_s": round(t_setup, 1),
        "pairs_per_s": round(steady, 3), "s_per_step": round((stamps[-1] - stamps[0]) / (len(stamps) - 1), 2),
        "peak_rss_gib": round(peak_rss_gib, 2), "rss_gib_per_step": rss_gib, "gpu_peak_gib": None if gpu_peak is None else round(gpu_peak, 2),
        "allocator": ("jemalloc " + os.environ.get("MALLOC_CONF", "")).strip()
        if "jemalloc" in Path("/proc/self/maps").read_text() else "glibc",
        "minor_faults": usage.ru_minflt - faults0.ru_minflt,  # page faults: freed blocks glibc gave back
        "system_cpu_share": round((usage.ru_stime - faults0.ru_stime) / max(
            usage.ru_stime - faults0.ru_stime + usage.ru_utime - faults0.ru_utime, 1e-9), 3),
    }


VARIANTS = {"defaults": (1, 0), "no-gc": (0, 0), "precompute": (0, 1)}  # (gradient checkpointing, precompute ref)


def parser() -> argparse.ArgumentParser:
    from train.dpo import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step when --shapes is not given")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxA",
                   help="micro-batch x gradient accumulation shapes to compare, e.g. 2x2 1x4 (same pairs per step)")
    p.add_argument("--pairs", default="", help="a pairs.parquet to train on (its first rows) instead of synthetic pairs")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is not timed")
    p.add_argument("--learning-rate", type=float, default=5e-6,
                   help="the optimizer's (configs/experiment-cpu.yaml trains at 1e-4)")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                   help="train.precision values to compare (each with every variant)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--allocators", nargs="+", default=["glibc"], choices=list(ALLOCATOR_CONFS),
                   help="malloc for each variant's process: glibc's, or jemalloc (LD_PRELOAD) with MALLOC_CONF: "
                        "'jemalloc' as train.allocator gives it, 'jemalloc-nodecay' (freed memory never given back), "
                        "'jemalloc-default' (jemalloc's own 10 s decay), 'jemalloc-decay30' (dirty pages kept 30 s), "
                        "'jemalloc-nodecay-1arena' (decay off, one arena)")
    p.add_argument("--json", default="", help="write the results here (one variant and precision: that result)")
    p.add_argument("--gc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--precompute", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    return p


def parse_shapes(shapes: list[str] | None, batch_size: int) -> list[tuple[int, int]]:
    """["2x2", "1x4"] -> [(2, 2), (1, 4)]; every shape must give the same pairs per optimizer step."""
    if not shapes:
        return [(batch_size, 1)]
    out = []
    for text in shapes:
        try:
            b, a = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {text!r} is not BxA (micro-batch x accumulation), e.g. 2x2") from None
        if b < 1 or a < 1:
            raise SystemExit(f"--shapes: {text!r}: both numbers must be >= 1")
        out.append((b, a))
    if len({b * a for b, a in out}) != 1:
        raise SystemExit(f"--shapes {' '.join(shapes)}: every shape must train on the same pairs per optimizer step")
    return out


def _shipped_conf() -> str:
    from train import allocator as malloc

    return malloc.MALLOC_CONF


ALLOCATOR_CONFS = {"glibc": None, "jemalloc": _shipped_conf, "jemalloc-nodecay": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
                   "jemalloc-default": "",
                   # bounded: pages unused for longer than about one step go back to the kernel
                   "jemalloc-decay30": "dirty_decay_ms:30000,muzzy_decay_ms:0",
                   "jemalloc-nodecay-1arena": "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:1"}


def allocator_env(name: str) -> dict[str, str]:
    """The environment of a variant's process: jemalloc preloaded with that MALLOC_CONF, or nothing for glibc."""
    from train import allocator as malloc

    conf = ALLOCATOR_CONFS[name]
    if conf is None:
        return {}
    lib = malloc.find_jemalloc()
    if lib is None:
        raise SystemExit(f"--allocators {name}: no libjemalloc.so.2 in {malloc.JEMALLOC_PATHS} "
                         "(Debian: apt install libjemalloc2)")
    return {"LD_PRELOAD": lib, "MALLOC_CONF": conf() if callable(conf) else conf}


def main() -> int:
    args = parser().parse_args()
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the first step is not timed), got {args.steps}")
    if args.pairs and not Path(args.pairs).is_file():
        raise SystemExit(f"--pairs {args.pairs}: no such file")
    if args.gc is not None:  # child: one variant, one JSON line
        args.gc, args.precompute, args.precision = bool(args.gc), bool(args.precompute), args.precision[0]
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    from gen.model_source import resolve_model

    resolve_model(args.model)  # build/fetch once, before the timed children
    results = []
    shapes = parse_shapes(args.shapes, args.batch_size)
    for precision in args.precision:
        for variant, (batch, accum), alloc in ((v, s, m) for v in args.variants for s in shapes
                                               for m in args.allocators):
            gc, pre = VARIANTS[variant]
            cmd = [sys.executable, __file__, "--model", args.model, "--max-length", str(args.max_length),
                   "--batch-size", str(batch), "--grad-accum", str(accum), "--steps", str(args.steps),
                   "--precision", precision, "--gc", str(gc), "--precompute", str(pre),
                   "--learning-rate", str(args.learning_rate),
                   *(["--pairs", args.pairs] if args.pairs else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1", **allocator_env(alloc)})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} precision {precision} failed (exit {proc.returncode})")
            r = json.loads(line[len("RESULT "):])
            r["variant"], r["precision_asked"] = variant, precision
            results.append(r)
            print(json.dumps(r), flush=True)
    base = results[0]["pairs_per_s"]
    print(f"\n{'precision':<15}{'variant':<52}{'pairs/s':>9}{'s/step':>8}{'vs first':>9}{'peak RSS GiB':>14}"
          f"{'minor faults':>14}{'sys CPU':>9}  allocator")
    for r in results:
        gc, pre = r["gradient_checkpointing"], r["precompute_ref_log_probs"]
        name = (f"grad ckpt {'on ' if gc else 'off'}, precompute ref {'on' if pre else 'off'}, "
                f"{r['batch_size']}x{r['grad_accum']}")
        ratio = r["pairs_per_s"] / base
        print(f"{r['precision']:<15}{name:<52}{r['pairs_per_s']:>9.3f}{r['s_per_step']:>8.1f}{ratio:>8.2f}x"
              f"{r['peak_rss_gib']:>14.2f}{r['minor_faults']:>14,}{r['system_cpu_share']:>9.0%}  {r['allocator']}")
        print(f"{'':<15}RSS after each step (GiB): {' '.join(f'{x:.1f}' for x in r['rss_gib_per_step'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
