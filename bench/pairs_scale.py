"""Pair selection at scale: 500 pairs from a synthetic pool of 1,000,000 rows in 200 shards.

    python bench/pairs_scale.py [--rows 1000000] [--problems 5000] [--shards 200] [--layout blocks|interleaved]
                                [--repeat 3] [--pairs 500]

Builds a gen run folder once (cached in ~/.cache/pairloop/bench/, reused while its parameters match): `--problems`
problems x rows/problems samples, completions of 200-800 characters, per-problem pass rates spread over [0, 1],
realistic failure categories, 0.5% INFRA_ERROR, ~3% exact and ~1% whitespace-only duplicate completions.
Layout `blocks` is gen's (a unit = a block of problems x a block of sample indices, so a problem spans a couple of
shards); `interleaved` puts every problem in every shard (the worst case for reading texts back).

Then runs `python -m pairs` on it in a subprocess, --repeat times, and prints the wall time (process start to exit,
interpreter and imports included), its CPU time (user + system: what the wall time would be on an idle machine,
threads aside), the stage's own timings, and the peak RSS of the child (getrusage CHILDREN; this process only
builds the pool). Targets: < 10 s and < 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gen.shards import ROW_SCHEMA, ShardStore  # noqa: E402

FAILURES = {  # share of failing samples; a HumanEval-like mix for a small code model
    "ASSERTION_FAIL": 0.45, "NAME_ERROR": 0.08, "TYPE_ERROR": 0.08, "SYNTAX_ERROR": 0.05, "OTHER_EXCEPTION": 0.05,
    "TIMEOUT": 0.05, "NO_CODE": 0.06, "INDEX_ERROR": 0.04, "VALUE_ERROR": 0.03, "ATTRIBUTE_ERROR": 0.03,
    "KEY_ERROR": 0.02, "IMPORT_ERROR": 0.02, "ZERO_DIVISION": 0.01, "RECURSION": 0.01, "MEMORY": 0.01,
    "CRASHED": 0.01,
}
WORDS = ["x", "y", "result", "items", "value", "index", "count", "total", "n", "s", "for", "in", "range", "len",
         "return", "if", "else", "and", "or", "not", "append", "sorted", "sum", "max", "min", "0", "1", "2", "+",
         "-", "*", "==", "<", ">", "(", ")", "[", "]", ":", ","]


def code_bank(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` distinct code-like strings of 200-800 characters."""
    out = []
    for i in range(size):
        target = int(rng.integers(200, 800))
        lines = [f"def solution_{i}(x):"]
        length = len(lines[0])
        while length < target:
            depth = int(rng.integers(1, 3))
            line = "    " * depth + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 10))))
            lines.append(line)
            length += len(line) + 1
        out.append("\n".join(lines)[:target] + "\n")
    return np.array(out, dtype=object)


def build_pool(path: Path, rows: int, problems: int, shards: int, layout: str, seed: int = 0) -> None:
    n = rows // problems
    identity = {"bench": "pairs_scale", "rows": rows, "problems": problems, "shards": shards, "layout": layout,
                "seed": seed, "prompt_style": "base", "response_prefix": "", "version": 3}
    store = ShardStore(str(path))
    existing = store.read_manifest()
    if existing is not None and existing.identity == identity and existing.complete:
        return
    if path.exists():
        shutil.rmtree(path)
    rng = np.random.default_rng(seed)
    bank = code_bank(rng, 20_000)
    rate = rng.beta(0.6, 0.6, size=problems)  # many problems always/never solved, a band in between
    names = np.array(list(FAILURES), dtype=object)
    probs = np.array(list(FAILURES.values()))
    probs /= probs.sum()
    prompts = np.array([f"def task_{p}(x):\n    \"\"\"Task {p}: " + "compute the thing. " * 12 + "\"\"\"\n"
                        for p in range(problems)], dtype=object)
    m = store.open_run("bench-pool", identity)
    t0 = time.perf_counter()
    # unit = (problem block, sample block) in `blocks`; (all problems, sample block) in `interleaved`
    if layout == "blocks":
        sample_blocks = 2
        problem_blocks = max(1, shards // sample_blocks)
    else:
        sample_blocks, problem_blocks = shards, 1
    pb = np.array_split(np.arange(problems), problem_blocks)
    sb = np.array_split(np.arange(n), sample_blocks)
    done = 0
    for bi, pids in enumerate(pb):
        for si, sidx in enumerate(sb):
            p = np.repeat(pids, len(sidx))
            s = np.tile(sidx, len(pids))
            k = len(p)
            u = rng.random(k)
            passed = u < rate[p]
            outcome = np.where(passed, "PASS", rng.choice(names, size=k, p=probs)).astype(object)
            outcome[rng.random(k) < 0.005] = "INFRA_ERROR"
            phase = np.where(rng.random(k) < 0.2, "definition", "test").astype(object)
            phase[np.isin(outcome, ["PASS", "NO_CODE", "INFRA_ERROR"])] = None
            # a sample's text: a bank entry tagged with its sample index (distinct), except ~4% that repeat the
            # problem's "favourite" answer (duplicates within a problem), a quarter of those with extra spaces
            text_id = rng.integers(0, len(bank), size=k)
            dup = rng.random(k) < 0.04
            text_id[dup] = (p[dup] * 7919) % len(bank)
            # the same program gets the same verdict: a favourite answer passes on problems mostly solved
            outcome[dup] = np.where(rate[p[dup]] > 0.5, "PASS", names[(p[dup] * 31) % len(names)])
            phase[dup] = np.where(outcome[dup] == "PASS", None, "test")
            phase[dup & (outcome == "NO_CODE")] = None
            completion = pa.array(bank[text_id], type=pa.string())
            tag = pa.array(np.where(dup, np.where(rng.random(k) < 0.25, "   \n", ""),
                                    np.char.add("# sample ", s.astype(str))).astype(object), type=pa.string())
            completion = pc.binary_join_element_wise(completion, tag, "")
            lengths = pc.utf8_length(completion).to_numpy()
            unit = f"p{bi:04d}-s{si:04d}"
            table = pa.table({
                "run_id": pa.array(["bench-pool"] * k), "unit_id": pa.array([unit] * k),
                "problem_id": pa.array([f"bench/{x}" for x in p]), "sample_index": pa.array(s, pa.int32()),
                "run_seed": pa.array(np.full(k, seed), pa.int64()),
                "seed": pa.array(p.astype(np.int64) * 1_000_003 + s, pa.int64()),
                "model": pa.array(["bench-model"] * k), "adapter": pa.nulls(k, pa.string()),
                "prompt": pa.array(prompts[p], pa.string()), "completion": completion,
                "completion_tokens": pa.array((lengths / 3.5).astype(np.int32), pa.int32()),
                "finish_reason": pa.array(["stop"] * k), "cumulative_logprob": pa.array(-rng.random(k) * 50),
                "outcome": pa.array(outcome, pa.string()), "phase": pa.array(phase, pa.string()),
                "error_type": pa.nulls(k, pa.string()), "error_message": pa.nulls(k, pa.string()),
                "exec_time_s": pa.array(rng.random(k) * 0.01),
            }, schema=ROW_SCHEMA)
            store.write_unit(m, unit, table)
            done += k
            if len(m.units) % max(1, shards // 20) == 0:
                print(f"building pool: {done:,}/{problems * n:,} rows, {len(m.units)} shards, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    m.complete = True
    store.write_manifest(m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--problems", type=int, default=5000)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--layout", choices=["blocks", "interleaved"], default="blocks")
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/pairloop/bench"))
    args = ap.parse_args()
    pool = Path(args.cache) / f"pairs-pool-{args.rows}-{args.problems}-{args.shards}-{args.layout}"
    t = time.perf_counter()
    build_pool(pool, args.rows, args.problems, args.shards, args.layout)
    disk = sum(f.stat().st_size for f in pool.rglob("*.parquet"))
    print(f"pool: {pool} ({args.rows:,} rows, {len(list(pool.glob('shards/*.parquet')))} shards, "
          f"{disk / 2**20:.0f} MiB on disk; ready in {time.perf_counter() - t:.1f} s)")

    out = Path(args.cache) / "pairs-out"
    load = os.getloadavg()
    walls, cpus, reports = [], [], []
    for i in range(args.repeat):
        cmd = [sys.executable, "-m", "pairs", f"inputs={pool}", f"out={out}", f"num_pairs={args.pairs}",
               "allow_no_eval_set=true",  # a synthetic pool: no eval set exists
               "progress=false"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        reports.append(json.loads((out / "report.json").read_text()))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    rep = reports[-1]
    print(f"command: {' '.join(cmd[1:])}")
    print(f"pairs: {rep['pairs']} of {args.pairs}; {rep['problems_covered']} problems; "
          f"{rep['pool']['groups_eligible']} eligible groups; dedup {rep['pool']['dedup']}")
    print(f"load average before the runs: {load[0]:.1f} (this machine has {os.cpu_count()} cores)")
    for i, (w, c, r) in enumerate(zip(walls, cpus, reports)):
        print(f"run {i + 1}: wall {w:.2f} s, CPU {c:.2f} s (stage {r['elapsed_s']:.2f} s: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["timings_s"].items()) + ")")
    same = all(json.dumps(r["categories"]) == json.dumps(reports[0]["categories"]) for r in reports)
    print(f"best wall {min(walls):.2f} s (target < 10 s: {'OK' if min(walls) < 10 else 'MISSED'}); "
          f"peak RSS {peak_mb:.0f} MB (target < 2048 MB: {'OK' if peak_mb < 2048 else 'MISSED'}); "
          f"same composition every run: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
