"""Pool efficiency: usable pairs and usable problems per 1,000 generated tokens, gen.policy uniform vs adaptive.

    python bench/pool_efficiency.py                                                 # the real 0.5B model
    python bench/pool_efficiency.py --problems 24 --budget 16 --first-round 4 --round-size 4 --confidence 0.2
    python bench/pool_efficiency.py --model tiny --problems 6 --budget 8 --first-round 2 --round-size 2  # wiring

One process, one EnginePool, two gen runs (gen.run.run_generation) on the same problems (the first --problems of
HumanEval's train split, as `make demo` uses), with the same budget per problem (gen.n = --budget), seeds and
sampling: uniform draws the budget for every problem; adaptive spends it in rounds and stops a problem once a
one-sided binomial test at --confidence puts its pass rate outside the pairs window (gen.policy); a third run,
"adaptive+enough", also stops a problem once it holds --enough passes and --enough failures
(gen.enough_per_side; 0 skips the run; --runs picks which runs are made). Usable problems and usable pairs are gen.run.pool_value's (pass rate in
the window; pairs = sum of min(passes, fails, --cap), --cap = pairs.max_pairs_per_problem); "pairs stage" is what
the pairs stage itself selects from each run (pairs.run, uniform balance, num_pairs unbounded, --cap per problem,
max_reuse 2, length ratio and dedup as its defaults, leakage-checked against the eval half): the number that counts.

Printed side by side: samples, generated tokens, usable problems and pairs, both per 1,000 tokens, and the
adaptive/uniform ratios (target >= 1.5x). Then, from the same rows and no engine:
  - uniform cut to adaptive's tokens: the first n' samples of every problem with n' the largest whose tokens do not
    exceed adaptive's (the same token budget spent uniformly);
  - replays of the stopping rule (gen.policy.replay) on uniform's outcomes at other confidences and first rounds:
    how the trade moves, without another run;
  - whether each sample adaptive drew is uniform's sample of that index (it must be: seeds are per sample index).

    python bench/pool_efficiency.py --from-pool runs/experiment-cpu/gen --cap 4 --enough-values 2 3 4

replays gen.enough_per_side on a pool already drawn (e.g. the experiment's) and runs the pairs stage on each
truncation: pairs per 1,000 tokens with and without it, no engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def select_pairs(run_dir: str, out: str, cap: int, lo: float, hi: float) -> dict:
    """What the pairs stage itself selects from a gen run (its own rules; `cap` per problem; num_pairs unbounded so
    every quota is short and each category gives all it can): its report (pairs, problems_covered, ...)."""
    from pairs.config import PairsConfig
    from pairs.run import run as run_pairs

    pc = PairsConfig(inputs=[run_dir], out=out, num_pairs=100_000, max_pairs_per_problem=cap, pass_rate_min=lo,
                     pass_rate_max=hi, problems="humaneval", eval_problems="humaneval", eval_fraction=0.5,
                     split_seed=0, progress=False)
    try:
        return run_pairs(pc)
    except ValueError as e:
        if str(e).startswith(("no pair fits", "no problem has both")):  # nothing to pair: 0 is the answer
            print(f"  pairs stage on {run_dir}: {e}", file=sys.stderr)
            return {"pairs": 0, "problems_covered": 0, "rejected_outcomes": {}}
        raise


def write_copy(table, manifest, out: Path) -> str:
    """A complete gen run folder at `out` holding `table` (a subset of `manifest`'s run's rows), for the pairs stage."""
    from gen.shards import Manifest, ShardStore

    shutil.rmtree(out, ignore_errors=True)
    store = ShardStore(str(out))
    m = Manifest(run_id=manifest.run_id, identity=manifest.identity, summary=manifest.summary)
    store.fs.create_dir(store._p("shards"), recursive=True)
    store.write_unit(m, "subset", table)
    m.complete = True
    store.write_manifest(m)
    return str(out)


def from_pool(a) -> int:
    """--from-pool DIR: replay gen.enough_per_side on a pool already drawn (no engine) and let the pairs stage select
    from each truncation. The pool's own policy must be adaptive with the settings given here (or uniform): adding
    enough only stops problems sooner, so every row a replay keeps exists."""
    from gen.policy import AdaptivePolicy, replay, text_key
    from gen.run import pool_value
    from gen.shards import ShardStore

    lo, hi = a.window
    src = ShardStore(a.from_pool)
    m = src.read_manifest()
    if m is None or not m.complete:
        print(f"pool_efficiency: {a.from_pool} is not a complete gen run", file=sys.stderr)
        return 2
    pol = m.identity.get("policy") or {}
    t = src.read_table()
    pids, outcomes = t.column("problem_id").to_pylist(), t.column("outcome").to_pylist()
    texts, tokens = t.column("completion").to_pylist(), t.column("completion_tokens").to_pylist()
    rows = defaultdict(list)
    for i, (p, k) in enumerate(zip(pids, t.column("sample_index").to_pylist())):
        rows[p].append((k, i))
    for p in rows:
        rows[p].sort()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="pl-pool-replay-"))
    print(f"pool {a.from_pool}: {t.num_rows} rows, policy {pol or 'uniform'}; cap {a.cap}, window {lo:g}..{hi:g}")
    print(f"  {'':<22} {'samples':>7} {'tokens':>8} {'usable':>6} {'proxy pairs':>11} {'stage pairs':>11} "
          f"{'problems':>8} {'stage pairs/1k':>14}")
    base = None
    for k in [0, *a.enough_values]:
        policy = AdaptivePolicy(m.identity["n"], pol.get("first_round", m.identity["n"]),
                                pol.get("round_size", m.identity["n"]), lo, hi, pol.get("confidence", 0.5), k)
        keep = []
        for p, idx in rows.items():
            n = replay(policy, [outcomes[i] for _, i in idx], [text_key(texts[i]) for _, i in idx]) if k else len(idx)
            keep += [i for _, i in idx[:n]]
        keep.sort()
        out = write_copy(t.take(keep), m, work / f"enough-{k}")
        v = pool_value([pids[i] for i in keep], [outcomes[i] for i in keep],
                       [tokens[i] for i in keep], (lo, hi), a.cap)
        rep = select_pairs(str(out), str(work / f"pairs-{k}"), a.cap, lo, hi)
        rate = 1000 * rep["pairs"] / max(v["generated_tokens"], 1)
        base = rate if base is None else base
        print(f"  {'as drawn' if not k else f'+ enough {k}':<22} {len(keep):>7} {v['generated_tokens']:>8} "
              f"{v['usable_problems']:>6} {v['usable_pairs']:>11} {rep['pairs']:>11} {rep['problems_covered']:>8} "
              f"{rate:>14.3f}  ({rate / base:.2f}x)  rejected: {rep['rejected_outcomes']}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="tiny | a built-in name | a model folder")
    ap.add_argument("--problems", type=int, default=24, help="first N problems of HumanEval's train split")
    ap.add_argument("--budget", type=int, default=16, help="gen.n: samples per problem (adaptive: at most)")
    ap.add_argument("--first-round", type=int, default=4)
    ap.add_argument("--round-size", type=int, default=4)
    ap.add_argument("--confidence", type=float, default=0.2, help="gen.stop_confidence")
    ap.add_argument("--window", type=float, nargs=2, default=(0.05, 0.95), metavar=("MIN", "MAX"),
                    help="pass-rate window (pairs.pass_rate_min/max)")
    ap.add_argument("--cap", type=int, default=4, help="pairs.max_pairs_per_problem (configs/experiment-cpu.yaml's)")
    ap.add_argument("--enough", type=int, default=-1,
                    help="gen.enough_per_side of the third run (default: --cap; 0: no third run)")
    ap.add_argument("--runs", nargs="+", default=["uniform", "adaptive", "adaptive+enough"],
                    choices=["uniform", "adaptive", "adaptive+enough"],
                    help="gen runs to make (uniform always runs: the others are compared with it and replayed on it)")
    ap.add_argument("--from-pool", metavar="DIR", help="no engine: replay enough_per_side on this gen run (below)")
    ap.add_argument("--enough-values", type=int, nargs="+", default=[2, 3, 4], help="--from-pool: k values")
    ap.add_argument("--replay-confidences", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.5, 0.8])
    ap.add_argument("--max-tokens", type=int, default=384, help="as configs/demo.yaml")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--problems-per-unit", type=int, default=4)
    ap.add_argument("--dtype", default="auto", help="engine.dtype")
    ap.add_argument("--max-model-len", type=int, default=1536)
    ap.add_argument("--kv-gib", type=float, default=2.0, help="engine.cpu_kv_cache_gib")
    ap.add_argument("--workers", type=int, default=0, help="sandbox workers (0 = all cores)")
    ap.add_argument("--keep", metavar="DIR", help="write the two run folders here and keep them")
    a = ap.parse_args()
    if a.enough < 0:
        a.enough = a.cap
    if a.from_pool:
        return from_pool(a)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pyarrow.compute as pc
    import ray

    from gen.config import ExecutionConfig, GenConfig, SamplingConfig
    from gen.engine import EngineConfig, EnginePool
    from gen.model_source import resolve_model
    from gen.policy import AdaptivePolicy, replay, text_key
    from gen.run import pool_value, run_generation
    from gen.shards import ShardStore

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="pl-pool-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        from tiny_model import build_tiny_model

        model_path = str(build_tiny_model(work / "tiny"))
    else:
        model_path = resolve_model(a.model)
    lo, hi = a.window
    common = dict(problems="humaneval", split="train", eval_fraction=0.5, split_seed=0, limit=a.problems,
                  n=a.budget, problems_per_unit=a.problems_per_unit, pass_rate_min=lo, pass_rate_max=hi,
                  sampling=SamplingConfig(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p),
                  execution=ExecutionConfig(workers=a.workers))
    uniform_cfg = GenConfig(out=str(work / "uniform"), **common)
    adaptive_cfg = GenConfig(out=str(work / "adaptive"), policy="adaptive", first_round=a.first_round,
                             round_size=a.round_size, stop_confidence=a.confidence, **common)
    runs = {"uniform": uniform_cfg}
    if "adaptive" in a.runs:
        runs["adaptive"] = adaptive_cfg
    if a.enough and "adaptive+enough" in a.runs:
        runs["adaptive+enough"] = replace(adaptive_cfg, out=str(work / "adaptive-enough"), enough_per_side=a.enough)
    engine_cfg = EngineConfig(model=model_path, dtype=a.dtype, max_model_len=a.max_model_len,
                              cpu_kv_cache_gib=a.kv_gib, enable_lora=False)
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    pool = EnginePool(engine_cfg, model_path)
    walls = {}
    try:
        for name, cfg in runs.items():
            t0 = time.perf_counter()
            res = run_generation(cfg, engine_cfg, pool=pool)
            walls[name] = time.perf_counter() - t0
            if not res.complete:
                print(f"pool_efficiency: {name} run incomplete: {res.failed_units}", file=sys.stderr)
                return 1
    finally:
        pool.shutdown()
        ray.shutdown()

    def rows(cfg) -> dict[str, list[dict]]:
        """problem id -> its rows in sample-index order"""
        t = ShardStore(cfg.out).read_table(columns=["problem_id", "sample_index", "completion", "outcome",
                                                    "completion_tokens"])
        out = defaultdict(list)
        for r in sorted(t.to_pylist(), key=lambda r: (r["problem_id"], r["sample_index"])):
            out[r["problem_id"]].append(r)
        return out

    drawn = {name: rows(cfg) for name, cfg in runs.items()}
    uni = drawn["uniform"]
    keys = {p: [text_key(r["completion"]) for r in rs] for p, rs in uni.items()}  # what enough_per_side tells apart

    def measured(per_problem: dict[str, list[dict]]) -> dict:
        picked = [r for rs in per_problem.values() for r in rs]
        v = pool_value([r["problem_id"] for r in picked], [r["outcome"] for r in picked],
                       [r["completion_tokens"] for r in picked], (lo, hi), cap=a.cap)
        return {**v, "samples": len(picked)}

    def value(per_problem: dict[str, int]) -> dict:
        """pool_value of the first k uniform samples of each problem (k per problem)."""
        return measured({pid: uni[pid][:k] for pid, k in per_problem.items()})

    def pairs_stage(name: str, cfg) -> dict:
        return select_pairs(cfg.out, str(work / f"pairs-{name}"), a.cap, lo, hi)

    def per_1k(v: dict, key: str) -> float:
        return 1000 * v[key] / v["generated_tokens"] if v["generated_tokens"] else 0.0

    def line(label: str, v: dict, wall: float | None = None) -> None:
        stage = (f" {v['stage_pairs']:>6} {v['stage_problems']:>5} "
                 f"{1000 * v['stage_pairs'] / max(v['generated_tokens'], 1):>9.3f}"
                 if "stage_pairs" in v else f" {'':>6} {'':>5} {'':>9}")
        print(f"  {label:<40} {v['samples']:>7} {v['generated_tokens']:>8} {v['usable_problems']:>7} "
              f"{v['usable_pairs']:>6} {per_1k(v, 'usable_pairs'):>10.3f} {per_1k(v, 'usable_problems'):>12.3f}"
              + stage + (f" {wall:>7.0f}" if wall is not None else ""))

    print(f"\nmodel {a.model} (engine.dtype {a.dtype}): {a.problems} HumanEval train problems, budget {a.budget} "
          f"per problem, T={a.temperature}, max_tokens {a.max_tokens}; window {lo:g}..{hi:g}, cap {a.cap} pairs "
          f"per problem; adaptive: first round {a.first_round}, rounds of {a.round_size}, confidence {a.confidence:g}"
          + (f"; adaptive+enough: {a.enough} distinct texts per side" if "adaptive+enough" in runs else ""))
    print("  pairs = sum over usable problems of min(passes, fails, cap) (gen.run.pool_value; no dedup or length "
          "bounds); stage = what the pairs stage selects (dedup, length ratio, max_reuse 2)")
    print(f"  {'':<40} {'samples':>7} {'tokens':>8} {'usable':>7} {'pairs':>6} {'pairs/1k':>10} "
          f"{'problems/1k':>12} {'stage:pairs':>6} {'probs':>5} {'pairs/1k':>9} {'wall s':>7}")
    v = {}
    for name, cfg in runs.items():
        v[name] = measured(drawn[name])
        rep = pairs_stage(name, cfg)
        v[name]["stage_pairs"], v[name]["stage_problems"] = rep["pairs"], rep["problems_covered"]
        v[name]["stage_rejected"] = rep["rejected_outcomes"]
        label = f"uniform n={a.budget}" if name == "uniform" else name
        line(label, v[name], walls[name])
    for name in runs:
        print(f"  {name}: the pairs stage's rejected side by outcome: {v[name]['stage_rejected']}")
    u = v["uniform"]

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if y else "n/a"

    for name in runs:
        if name == "uniform":
            continue
        d = v[name]
        print(f"  ratio {name} / uniform: samples {ratio(d['samples'], u['samples'])}, tokens "
              f"{ratio(d['generated_tokens'], u['generated_tokens'])}; pairs/1k "
              f"{ratio(per_1k(d, 'usable_pairs'), per_1k(u, 'usable_pairs'))}, problems/1k "
              f"{ratio(per_1k(d, 'usable_problems'), per_1k(u, 'usable_problems'))}; **the pairs stage's pairs/1k "
              f"{ratio(d['stage_pairs'] / max(d['generated_tokens'], 1), u['stage_pairs'] / max(u['generated_tokens'], 1))}**")
    ok = True
    for name in runs:
        if name == "uniform":
            continue
        ada = drawn[name]
        per = defaultdict(int)
        for pid in ada:
            per[len(ada[pid])] += 1
        mismatched = sum(r["completion"] != uni[pid][r["sample_index"]]["completion"]
                         for pid, rs in ada.items() for r in rs)
        policy = AdaptivePolicy.of(runs[name])
        replayed = {p: replay(policy, [r["outcome"] for r in uni[p]], keys[p]) for p in uni}
        same = replayed == {p: len(rs) for p, rs in ada.items()}
        ok = ok and same and not mismatched
        print(f"  {name} samples per problem: {dict(sorted(per.items()))} (count -> problems); {mismatched} of "
              f"{v[name]['samples']} samples differ from uniform's of the same index; a replay of its settings on "
              f"uniform's outcomes {'matches' if same else 'DIFFERS FROM'} what it drew")

    print("\n  from uniform's rows, no engine (pool_value only):")
    ut, um = ShardStore(uniform_cfg.out).read_table(), ShardStore(uniform_cfg.out).read_manifest()
    for name in runs:
        if name != "uniform":
            d = v[name]
            cut = max((k for k in range(1, a.budget + 1)
                       if value({p: k for p in uni})["generated_tokens"] <= d["generated_tokens"]), default=1)
            cv = value({p: cut for p in uni})
            rep = select_pairs(write_copy(ut.filter(pc.less(ut.column("sample_index"), cut)), um,
                                          work / f"uniform-{cut}"),
                               str(work / f"pairs-uniform-{cut}"), a.cap, lo, hi)
            cv["stage_pairs"], cv["stage_problems"] = rep["pairs"], rep["problems_covered"]
            line(f"uniform n={cut} (tokens <= {name}'s)", cv)
            print(f"  {name} vs uniform n={cut}, about the same tokens: the pairs stage's pairs/1k "
                  f"{ratio(d['stage_pairs'] / max(d['generated_tokens'], 1), cv['stage_pairs'] / max(cv['generated_tokens'], 1))}")
    for fr, rs in dict.fromkeys([(a.first_round, a.round_size), (max(1, a.first_round // 2), a.round_size)]):
        for c in a.replay_confidences:
            for k in dict.fromkeys([0, a.enough]):
                pol = AdaptivePolicy(a.budget, fr, rs, lo, hi, c, k)
                line(f"replay first {fr}, rounds {rs}, c={c:g}" + (f", enough {k}" if k else ""),
                     value({p: replay(pol, [r["outcome"] for r in uni[p]], keys[p]) for p in uni}))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
