"""Per-problem CPU-time limits from each problem's reference solution (evalplus's rule, in CPU seconds).

    from tasks.time_limits import derive_limits, measure_references, measurement_key
    key = measurement_key(problems, limits)                      # what a cached measurement is valid for
    measured = measure_references(problems, limits, workers=2)   # JSON-ready; cache it under `key`
    cpu_limits, kept_fixed = derive_limits(measured, problems, floor_s=1.0, factor=4.0, cap_s=limits.cpu_s)

A problem's limit is max(floor_s, factor x its reference's CPU time), rounded up to the millisecond and never above
cap_s (the pool's Limits.cpu_s). The reference's CPU time is what the sandbox reports for the job (`exec_time_s`:
the job process from its fork, set-up, definition and the problem's tests), the same quantity `Job.cpu_s` limits,
measured REPEATS times in interleaved rounds and taken at its maximum: a robust high value, so a reference (and a
completion as fast as it) does not TIMEOUT on a busier machine. CPU time does not grow with load the way wall time
does, but cache and memory contention still move it by tens of percent; the floor absorbs the rest.

A problem without a reference, or whose reference does not PASS in every round (it fails, times out, or needs a
helper the judge lacks), keeps cap_s; `kept_fixed` says which and why. Measuring is the caller's job to cache
(the foundation writes no files): gen keeps it under $PAIRLOOP_CACHE keyed by `measurement_key`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import warnings
from typing import Any, Sequence

from sandbox import Job, Limits, Sandbox
from tasks.problems import Problem, problem_set_fingerprint

REPEATS = 5  # rounds per reference; the max of 5 covers a round that shared its core with a burst of other work
FORMAT = "reference-cpu/v1"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows: a measurement holds for one CPU model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def harness_version() -> str:
    """sha256 of the sandbox's own source: a changed harness (its per-job overhead included) re-measures."""
    import sandbox

    h = hashlib.sha256()
    for name in ("executor.py", "_worker.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(sandbox.__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def measurement_key(problems: Sequence[Problem], limits: Limits, repeats: int = REPEATS) -> str:
    """Content hash of everything a measurement depends on: the problems with their references, the harness, the
    CPU model, the Python, the limits it ran under and the number of rounds."""
    return hashlib.sha256(json.dumps({
        "format": FORMAT, "problems": problem_set_fingerprint(problems, with_reference=True),
        "harness": harness_version(), "cpu": cpu_model(), "python": sys.version,
        "limits": dataclasses.asdict(limits), "repeats": repeats,
    }, sort_keys=True).encode()).hexdigest()


def measure_references(problems: Sequence[Problem], limits: Limits, workers: int | None = None,
                       repeats: int = REPEATS) -> dict[str, Any]:
    """Run every reference `repeats` times (each round all problems, so a burst of load hits one round of each)
    under `limits`. Returns {"format", "key", "cpu_model", "repeats", "problems": {id: {"cpu_s": [...]} for a
    reference that passed every round, {"outcome", "error"} for one that did not}}; problems without a reference
    are absent."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    with_ref = [p for p in problems if p.reference is not None]
    jobs = [Job(p.reference, p.test, p.entry_point, p.prompt) for p in with_ref] * repeats
    results = []
    if jobs:
        with warnings.catch_warnings():  # the references are trusted code: weaker isolation does not matter here
            warnings.simplefilter("ignore", RuntimeWarning)
            box = Sandbox(workers=workers, limits=limits)
        with box:
            results = box.run(jobs)
    out: dict[str, dict[str, Any]] = {p.id: {"cpu_s": []} for p in with_ref}
    for p, r in zip(with_ref * repeats, results, strict=True):
        entry = out[p.id]
        if "outcome" in entry:
            continue
        if not r.passed:
            why = ": ".join(x for x in (r.error_type, r.error_message) if x)
            out[p.id] = {"outcome": r.outcome.value, "error": why[:300]}
            continue
        entry["cpu_s"].append(r.exec_time_s)
    return {"format": FORMAT, "key": measurement_key(problems, limits, repeats), "cpu_model": cpu_model(),
            "repeats": repeats, "problems": out}


def derive_limits(measured: dict[str, Any], problems: Sequence[Problem], floor_s: float, factor: float,
                  cap_s: float) -> tuple[dict[str, float], dict[str, str]]:
    """({problem id: CPU limit}, {problem id: why it keeps cap_s}) for every problem in `problems`."""
    if not (isinstance(factor, (int, float)) and factor > 1):
        raise ValueError(f"factor must be > 1, got {factor!r}")
    if not (isinstance(floor_s, (int, float)) and 0 < floor_s <= cap_s):
        raise ValueError(f"floor_s must be in (0, cap_s={cap_s!r}], got {floor_s!r}")
    entries = measured.get("problems")
    if not isinstance(entries, dict):
        raise ValueError(f"measured: no 'problems' mapping in {str(measured)[:200]!r}")
    limits: dict[str, float] = {}
    kept: dict[str, str] = {}
    for p in problems:
        entry = entries.get(p.id)
        if p.reference is None:
            limits[p.id], kept[p.id] = cap_s, "no reference solution"
        elif entry is None:
            raise ValueError(f"measured: problem {p.id!r} has a reference but no measurement (a different set?)")
        elif "outcome" in entry:
            error = entry.get("error")
            limits[p.id], kept[p.id] = cap_s, f"reference {entry['outcome']}" + (f": {error}" if error else "")
        else:
            cpu = max(entry["cpu_s"])
            limits[p.id] = min(cap_s, math.ceil(max(floor_s, factor * cpu) * 1000) / 1000)
    return limits, kept


def limits_digest(cpu_limits: dict[str, float]) -> str:
    """sha256 of the per-problem limits (a run's identity holds this, the manifest the limits themselves)."""
    return hashlib.sha256(json.dumps(sorted(cpu_limits.items())).encode()).hexdigest()
