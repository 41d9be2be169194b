"""Choose balanced DPO pairs from gen runs.

    python -m pairs --config configs/demo.yaml pairs.num_pairs=500
    pairloop pairs inputs=runs/demo/gen out=runs/demo/pairs balance=weights 'weights={NAME_ERROR: 3}'

Reads the runs' row metadata (streamed, small columns only), selects pairs (pairs.select), reads the texts of the
chosen rows only, and writes pairs.parquet + report.json + report.md atomically into `out`.

Leakage guard: every pool problem that can yield a pair is compared with the eval set (pairs.eval_problems and/or
pairs.eval_ids) by id, exact content and near-duplicate prompt (tasks.leakage); a match refuses unless
pairs.allow_leakage, and naming no eval set refuses unless pairs.allow_no_eval_set. pairs.parquet carries the
problem provenance record (tasks.leakage.PROVENANCE_KEY) that eval/ follows from an adapter back to its problems.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from gen.shards import config_to_dict
from pairs.config import PairsConfig
from pairs.output import attach_provenance, build_report, pairs_table, report_markdown, write_outputs
from pairs.pool import OUTCOMES, Pool, fetch_columns, scan_pool
from pairs.select import Plan, eligible, prepare, select_with_dedup
from tasks.leakage import Finding, find_overlap, problem_texts, provenance_record, record_texts
from tasks.problems import Problem, load_problems, problem_set_fingerprint, select_problems, split_problems


def eval_problem_set(cfg: PairsConfig) -> tuple[set[str], list[Problem], str | None]:
    """The leakage guard's eval side: every eval problem id, the eval problems whose content is known (those of
    pairs.eval_problems; listed pairs.eval_ids are ids only), and where they came from (None: no eval set named)."""
    ids = set(cfg.eval_ids)
    problems: list[Problem] = []
    parts = [f"{len(cfg.eval_ids)} listed ids"] if cfg.eval_ids else []
    if cfg.eval_problems is not None:
        problems = load_problems(cfg.eval_problems)
        if cfg.eval_fraction is not None:
            problems = split_problems(problems, cfg.eval_fraction, cfg.split_seed)[1]
            parts.append(f"eval split of {cfg.eval_problems!r} (eval_fraction={cfg.eval_fraction}, "
                         f"split_seed={cfg.split_seed})")
        else:
            parts.append(f"all of {cfg.eval_problems!r}")
        ids |= {p.id for p in problems}
    return ids, problems, (" + ".join(parts) if parts else None)


def problem_provenance(pool: Pool, problem_ids: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(problem sets, problems) for tasks.leakage.provenance_record: per input run, the problem set its manifest
    names, loaded and checked against the run's fingerprint; per problem in `problem_ids`, its prompt and test
    (when a verified problem set has it) and the exact prompt strings of its groups (always: what DPO sees)."""
    sets: list[dict[str, Any]] = []
    known: dict[str, Problem] = {}
    cache: dict[tuple, list[Problem] | str] = {}
    for r in pool.runs:
        ident = r.identity
        entry = {"run_id": r.run_id, "spec": ident.get("problems"), "fingerprint": ident.get("problem_set"),
                 "split": ident.get("split") or "all", "eval_fraction": ident.get("eval_fraction", 0.5),
                 "split_seed": ident.get("split_seed", 0), "limit": ident.get("limit") or 0, "verified": False,
                 "note": ""}
        if entry["spec"] is None or entry["fingerprint"] is None:
            entry["note"] = "the run's manifest names no problem set (spec and fingerprint)"
        else:
            key = (entry["spec"], entry["split"], entry["eval_fraction"], entry["split_seed"], entry["limit"])
            if key not in cache:
                try:
                    cache[key] = select_problems(*key)
                except (ValueError, RuntimeError, OSError) as e:
                    cache[key] = f"cannot load it: {type(e).__name__}: {e}"
            got = cache[key]
            if isinstance(got, str):
                entry["note"] = got
            elif problem_set_fingerprint(got) != entry["fingerprint"]:
                entry["note"] = "it differs from the one gen used (fingerprint mismatch): prompts/tests not recorded"
            else:
                entry["verified"] = True
                known.update({p.id: p for p in got})
        sets.append(entry)
    trained: dict[str, set[str]] = {pid: set() for pid in problem_ids}
    for g in pool.groups:
        if g.problem_id in trained:
            trained[g.problem_id].add(g.prompt)
    problems = [
        {"id": pid, "prompt": known[pid].prompt if pid in known else None,
         "test": known[pid].test if pid in known else None, "trained_prompts": sorted(trained[pid])}
        for pid in sorted(problem_ids)
    ]
    return sets, problems


def check_leakage(cfg: PairsConfig, eval_ids: set[str], eval_problems: list[Problem],
                  candidates: list[dict[str, Any]]) -> tuple[list[Finding], dict[str, Any]]:
    """Findings for candidate training problems (provenance entries) that are eval problems: the same id (listed
    ids or the eval set's), the same content or a near-duplicate prompt (tasks.leakage), and what was compared."""
    result = find_overlap(record_texts(candidates), problem_texts(eval_problems))
    seen = {f.eval_id for f in result.findings}
    listed = [Finding(i, i, "id", 1.0) for i in sorted(set(cfg.eval_ids) & {c["id"] for c in candidates})
              if i not in seen]
    compared = dict(result.compared, train_problems=len(candidates), listed_eval_ids=len(cfg.eval_ids),
                    eval_problems=len(eval_ids))
    return listed + result.findings, compared


def prompt_format(cfg: PairsConfig, pool: Pool) -> str:
    if cfg.prompt_format != "auto":
        return cfg.prompt_format
    styles = {r.identity.get("prompt_style") for r in pool.runs}
    return "chat" if styles == {"chat"} else "text"


def chat_messages_source(cfg: PairsConfig, pool: Pool) -> Callable[[str], list[dict[str, str]]]:
    """problem id -> the chat messages gen rendered its prompt from (tasks.prompts.chat_messages)."""
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
    eval_ids, eval_problems, eval_desc = eval_problem_set(cfg)
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
    problem_sets, candidate_records = problem_provenance(pool, candidates)
    if eval_desc is None:
        findings, compared = [], None
        warnings.append("NO EVAL SET: pairs.allow_no_eval_set=true, so no eval set was named and leakage was NOT "
                        "checked; do not evaluate an adapter trained on these pairs on any of their problems")
    else:
        findings, compared = check_leakage(cfg, eval_ids, eval_problems, candidate_records)
    leaked = sorted({f.train_id for f in findings})
    if leaked and not cfg.allow_leakage:
        raise ValueError(
            f"leakage: {len(leaked)} problem(s) that can yield pairs are in the eval set ({eval_desc}): "
            f"{leaked[:10]}{' ...' if len(leaked) > 10 else ''}; matches: {[f.describe() for f in findings[:10]]}. "
            "Generate on the training split, or set pairs.allow_leakage=true to train on eval problems anyway "
            "(the report will say so)."
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
    record = provenance_record(problem_sets, [c for c in candidate_records if c["id"] in pair_problems])
    table = attach_provenance(table, record)

    in_eval = sorted(pair_problems & set(leaked))
    if in_eval:
        msg = (f"LEAKAGE: {sum(1 for p in table.column('problem_id').to_pylist() if p in in_eval)} pairs from "
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
    leakage = {"eval_set": eval_desc, "eval_problems": len(eval_ids), "compared": compared,
               "findings": [asdict(f) for f in findings[:50]], "pair_problems_in_eval": len(in_eval),
               "allow_leakage": cfg.allow_leakage, "allow_no_eval_set": cfg.allow_no_eval_set,
               "problem_sets": problem_sets}
    report = build_report(config_to_dict(cfg), pool, plan, sel, table, fmt, dedup_stats, leakage, warnings,
                          time.perf_counter() - t0, finish={row: f for row, (_, f) in cache.items()})
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    paths = write_outputs(cfg.out, table, report, report_markdown(report))
    report["written"] = paths
    return report


def print_summary(report: dict[str, Any]) -> None:
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(f"pairs: {report['pairs']} of {report['asked']} ({report['format']} format), "
          f"{report['problems_covered']} problems, {report['elapsed_s']:.2f} s -> {report['written']['pairs.parquet']}")
    width = max([len(k) for k in report["categories"]] + [8])
    print(f"  {'category':<{width}}  {'pool':>8}  {'asked':>5}  {'got':>5}")
    for k, v in report["categories"].items():
        flag = "  exhausted" if v["exhausted"] else ""
        print(f"  {k:<{width}}  {v['pool']:>8}  {v['asked']:>5}  {v['got']:>5}{flag}")
    for note in report["redistribution"]:
        print(f"  note: {note}")
