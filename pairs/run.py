"""Choose balanced DPO pairs from gen runs.

    python -m pairs --config configs/demo.yaml pairs.num_pairs=500
    pairloop pairs inputs=runs/demo/gen out=runs/demo/pairs balance=weights 'weights={NAME_ERROR: 3}'

Reads the runs' row metadata (streamed, small columns only), selects pairs (pairs.select), reads the texts of the
chosen rows only, and writes pairs.parquet + report.json + report.md atomically into `out`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np

from pairloop.config import config_to_dict
from pairs.config import PairsConfig
from pairs.output import build_report, pairs_table, report_markdown, write_outputs
from pairs.pool import OUTCOMES, Pool, fetch_columns, scan_pool
from pairs.select import Plan, eligible, prepare, select_with_dedup


def eval_problem_ids(cfg: PairsConfig) -> tuple[set[str], str | None]:
    """The leakage guard's problem ids and a description of where they came from (None: no eval set named)."""
    ids = set(cfg.eval_ids)
    parts = [f"{len(cfg.eval_ids)} listed ids"] if cfg.eval_ids else []
    if cfg.eval_problems is not None:
        from tasks.problems import load_problems, split_problems

        problems = load_problems(cfg.eval_problems)
        if cfg.eval_fraction is not None:
            problems = split_problems(problems, cfg.eval_fraction, cfg.split_seed)[1]
            parts.append(f"eval split of {cfg.eval_problems!r} (eval_fraction={cfg.eval_fraction}, "
                         f"split_seed={cfg.split_seed})")
        else:
            parts.append(f"all of {cfg.eval_problems!r}")
        ids |= {p.id for p in problems}
    return ids, (" + ".join(parts) if parts else None)


def prompt_format(cfg: PairsConfig, pool: Pool) -> str:
    if cfg.prompt_format != "auto":
        return cfg.prompt_format
    styles = {r.identity.get("prompt_style") for r in pool.runs}
    return "chat" if styles == {"chat"} else "text"


def chat_messages_source(cfg: PairsConfig, pool: Pool) -> Callable[[str], list[dict[str, str]]]:
    """problem id -> the chat messages gen rendered its prompt from (tasks.prompts.chat_messages)."""
    from tasks.problems import load_problems
    from tasks.prompts import chat_messages

    spec = cfg.problems
    if spec is None:
        specs = {r.identity.get("problems") for r in pool.runs}
        if len(specs) != 1 or None in specs:
            raise ValueError(
                f"pairs.problems: chat format needs the problem set the samples came from; the input manifests "
                f"name {sorted(map(str, specs))}; set pairs.problems=humaneval|mbpp|PATH"
            )
        spec = specs.pop()
    problems = {p.id: p for p in load_problems(spec)}

    def messages(problem_id: str) -> list[dict[str, str]]:
        if problem_id not in problems:
            raise ValueError(f"pairs.problems={spec!r} has no problem {problem_id!r} (a pool problem)")
        return chat_messages(problems[problem_id])

    return messages


def no_pairs_message(pool: Pool, plan: Plan, cfg: PairsConfig) -> str:
    n_fail = np.bincount(pool.group[plan.cat >= 0], minlength=len(pool.groups))
    has_pass, has_fail = plan.n_pass > 0, n_fail > 0
    both = has_pass & has_fail
    outcomes = np.bincount(pool.outcome, minlength=len(OUTCOMES))
    return (
        f"no problem has both a PASS and a usable failure inside the pass-rate window "
        f"[{cfg.pass_rate_min}, {cfg.pass_rate_max}]: of {len(pool.groups)} (problem, model, adapter, prompt) groups "
        f"in {len(pool)} rows, {int(has_pass.sum())} have a PASS, {int(has_fail.sum())} a usable failure "
        f"({', '.join(cfg.rejectable)}), {int(both.sum())} both, {int((both & plan.in_window).sum())} of those in "
        f"the window. Outcomes in the pool: "
        + ", ".join(f"{OUTCOMES[i]} {int(v)}" for i, v in enumerate(outcomes) if v)
    )


def run(cfg: PairsConfig, messages_for: Callable[[str], list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """Select pairs and write them with their report; returns the report. Raises ValueError on bad input."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    eval_ids, eval_desc = eval_problem_ids(cfg)
    pool = scan_pool(cfg.inputs, progress=cfg.progress, allow_incomplete=cfg.allow_incomplete)
    timings["scan"] = time.perf_counter() - t0
    fmt = prompt_format(cfg, pool)
    if fmt == "chat" and messages_for is None:
        messages_for = chat_messages_source(cfg, pool)
    plan = prepare(pool, cfg)
    _, _, ok = eligible(pool, plan, np.ones(len(pool), dtype=bool))
    if not ok.any():
        raise ValueError(no_pairs_message(pool, plan, cfg))

    warnings: list[str] = []
    # The guard looks at every problem that could yield a pair, not only the ones this seed happened to pick.
    candidates = {pool.problems[p] for p in np.unique(pool.group_problem[ok])}
    leaked = sorted(candidates & eval_ids)
    if eval_desc is None:
        warnings.append("no eval set named (pairs.eval_ids / pairs.eval_problems): leakage was not checked")
    if leaked and not cfg.allow_leakage:
        raise ValueError(
            f"leakage: {len(leaked)} problem(s) that can yield pairs are in the eval set ({eval_desc}): "
            f"{leaked[:10]}{' ...' if len(leaked) > 10 else ''}. Generate on the training split, or set "
            "pairs.allow_leakage=true to train on eval problems anyway (the report will say so)."
        )

    cache: dict[int, tuple[str, str | None]] = {}
    t_select = time.perf_counter()

    def fetch(rows: np.ndarray):
        t = time.perf_counter()
        cols = fetch_columns(pool, rows, ["completion", "finish_reason"], progress=cfg.progress)
        timings["read_texts"] = timings.get("read_texts", 0.0) + time.perf_counter() - t
        cache.update(zip(rows.tolist(), zip(cols["completion"], cols["finish_reason"])))
        return cols["completion"]

    sel, dedup_stats = select_with_dedup(pool, plan, fetch)
    if not sel.pairs:
        raise ValueError(
            f"no pair fits: {int(ok.sum())} groups have a PASS and a usable failure in the window, but no PASS is "
            f"within the length ratio [{cfg.length_ratio_min}, {cfg.length_ratio_max}] of a failure of its group "
            f"(pairs.length_ratio_min/max) once duplicate and unreproducible texts are dropped (dedup: {dedup_stats})"
        )
    missing = np.array(sorted({x for c, r, _ in sel.pairs for x in (c, r)} - set(cache)), dtype=np.int64)
    if len(missing):
        fetch(missing)
    timings["select_and_dedup"] = time.perf_counter() - t_select - timings.get("read_texts", 0.0)
    table = pairs_table(pool, plan, sel, cache, fmt, messages_for)

    pair_problems = set(table.column("problem_id").to_pylist())
    in_eval = sorted(pair_problems & eval_ids)
    if in_eval:
        msg = (f"LEAKAGE: {sum(1 for p in table.column('problem_id').to_pylist() if p in eval_ids)} pairs from "
               f"{len(in_eval)} eval problem(s) ({eval_desc}) were written because allow_leakage=true; results on "
               f"those problems measure memorisation, not improvement: {in_eval[:10]}")
        warnings.insert(0, msg)
        print(f"\n{'!' * 78}\npairloop pairs: {msg}\n{'!' * 78}\n", file=sys.stderr)
    elif leaked:
        warnings.append(f"allow_leakage=true: {len(leaked)} eval problem(s) could have yielded pairs; none did")
    if len(sel.pairs) < cfg.num_pairs:
        warnings.append(f"only {len(sel.pairs)} of the {cfg.num_pairs} pairs asked for fit the constraints")
    incomplete = [f"{r.uri}: {r.incomplete}" for r in pool.runs if r.incomplete]
    if incomplete:  # first in the report: the pool itself is partial
        msg = f"INCOMPLETE input run(s) used because allow_incomplete=true: {'; '.join(incomplete)}"
        warnings.insert(0, msg)
        print(f"pairloop pairs: {msg}", file=sys.stderr)
    leakage = {"eval_set": eval_desc, "eval_problems": len(eval_ids), "pair_problems_in_eval": len(in_eval),
               "allow_leakage": cfg.allow_leakage}
    report = build_report(config_to_dict(cfg), pool, plan, sel, table, fmt, dedup_stats, leakage, warnings,
                          time.perf_counter() - t0)
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    paths = write_outputs(cfg.out, table, report, report_markdown(report))
    report["written"] = paths
    return report


def print_summary(report: dict[str, Any]) -> None:
    print(f"pairs: {report['pairs']} of {report['asked']} ({report['format']} format), "
          f"{report['problems_covered']} problems, {report['elapsed_s']:.2f} s -> {report['written']['pairs.parquet']}")
    width = max([len(k) for k in report["categories"]] + [8])
    print(f"  {'category':<{width}}  {'pool':>8}  {'asked':>5}  {'got':>5}")
    for k, v in report["categories"].items():
        flag = "  exhausted" if v["exhausted"] else ""
        print(f"  {k:<{width}}  {v['pool']:>8}  {v['asked']:>5}  {v['got']:>5}{flag}")
    for note in report["redistribution"]:
        print(f"  note: {note}")
    for w in report["warnings"]:
        print(f"  WARNING: {w}")


def main(argv: list[str]) -> int:
    from pairloop.config import load_config

    try:
        cfg = load_config(PairsConfig, argv, section="pairs")
        report = run(cfg)
    except ValueError as e:
        print(f"pairloop pairs: {e}", file=sys.stderr)
        return 2
    print_summary(report)
    return 0
