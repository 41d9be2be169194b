"""Per-job CPU-time limits from a reference solution's measured CPU time (evalplus's rule, in CPU seconds).
Standard library only; imports nothing from the project but the sandbox itself.

    from sandbox.time_limits import derive_limits, measure_references, measurement_key
    key = measurement_key(content_hash, limits)                          # what a cached measurement is valid for
    measured = measure_references({name: Job(reference, ...) or None}, limits, workers=2)   # JSON-ready
    cpu_limits, kept = derive_limits(measured, names, floor_s=1.0, factor=4.0, cap_s=limits.cpu_s)

A name's limit is max(floor_s, factor x its reference's CPU time), rounded up to the millisecond and never above
cap_s (the pool's Limits.cpu_s). The reference's CPU time is what the sandbox reports for the job (`exec_time_s`:
the job process from its fork: set-up, definition and the problem's tests), the same quantity `Job.cpu_s` limits,
measured REPEATS times in interleaved rounds and taken at its maximum: a robust high value, so a reference (and a
completion as fast as it) does not TIMEOUT on a busier machine. CPU time does not grow with load the way wall time
does, but cache and memory contention still move it by tens of percent; the floor absorbs the rest.

A name without a reference (None), or whose reference does not PASS in every round (it fails, times out, or needs
a helper the judge lacks), keeps cap_s; `kept` says which and why. Caching is the caller's (this module writes no
files): gen keeps measurements under $PAIRLOOP_CACHE keyed by `measurement_key` over its problem set's content.
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
from typing import Any, Iterable, Mapping

from sandbox.executor import Job, Limits, Sandbox

REPEATS = 5  # rounds per reference; the max of 5 covers a round that shared its core with a burst of other work
FORMAT = "reference-cpu/v1"
NO_REFERENCE = "no reference solution"


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
    h = hashlib.sha256()
    for name in ("executor.py", "_worker.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def measurement_key(content: str, limits: Limits, repeats: int = REPEATS) -> str:
    """Content hash of everything a measurement depends on: `content` (the caller's hash of the references and
    their tests, e.g. tasks.problems.problem_set_fingerprint(problems, with_reference=True)), the harness, the CPU
    model, the Python, the limits it ran under and the number of rounds."""
    return hashlib.sha256(json.dumps({
        "format": FORMAT, "content": content, "harness": harness_version(), "cpu": cpu_model(),
        "python": sys.version, "limits": dataclasses.asdict(limits), "repeats": repeats,
    }, sort_keys=True).encode()).hexdigest()


def measure_references(jobs: Mapping[str, Job | None], limits: Limits, workers: int | None = None,
                       repeats: int = REPEATS) -> dict[str, Any]:
    """Run every reference job `repeats` times (each round all of them, so a burst of load hits one round of each)
    under `limits`. Returns {"format", "cpu_model", "repeats", "references": {name: {"cpu_s": [...]} for a
    reference that passed every round, {"kept": why, "outcome": ...} for one that did not, {"kept": NO_REFERENCE}
    for None}}."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    named = [(name, job) for name, job in jobs.items() if job is not None]
    results = []
    if named:
        with warnings.catch_warnings():  # the references are trusted code: weaker isolation does not matter here
            warnings.simplefilter("ignore", RuntimeWarning)
            box = Sandbox(workers=workers, limits=limits)
        with box:
            results = box.run([job for _, job in named] * repeats)
    out: dict[str, dict[str, Any]] = {name: {"kept": NO_REFERENCE} if job is None else {"cpu_s": []}
                                      for name, job in jobs.items()}
    for (name, _), r in zip(named * repeats, results, strict=True):
        entry = out[name]
        if "kept" in entry:
            continue
        if not r.passed:
            why = ": ".join(x for x in (r.error_type, r.error_message) if x)
            out[name] = {"kept": f"reference {r.outcome.value}" + (f": {why[:300]}" if why else ""),
                         "outcome": r.outcome.value}
            continue
        entry["cpu_s"].append(r.exec_time_s)
    return {"format": FORMAT, "cpu_model": cpu_model(), "repeats": repeats, "references": out}


def derive_limits(measured: Mapping[str, Any], names: Iterable[str], floor_s: float, factor: float,
                  cap_s: float) -> tuple[dict[str, float], dict[str, str]]:
    """({name: CPU limit}, {name: why it keeps cap_s}) for every name; ValueError if one was not measured."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor!r}")
    if isinstance(floor_s, bool) or not isinstance(floor_s, (int, float)) or not 0 < floor_s <= cap_s:
        raise ValueError(f"floor_s must be in (0, cap_s={cap_s!r}], got {floor_s!r}")
    entries = measured.get("references")
    if not isinstance(entries, Mapping):
        raise ValueError(f"measured: no 'references' mapping in {str(measured)[:200]!r}")
    limits: dict[str, float] = {}
    kept: dict[str, str] = {}
    for name in names:
        entry = entries.get(name)
        if not isinstance(entry, Mapping) or not ("kept" in entry or entry.get("cpu_s")):
            raise ValueError(f"measured: no measurement of {name!r} (got {entry!r:.200}): measured for another set?")
        if "kept" in entry:
            limits[name], kept[name] = cap_s, str(entry["kept"])
        else:
            limits[name] = min(cap_s, math.ceil(max(floor_s, factor * max(entry["cpu_s"])) * 1000) / 1000)
    return limits, kept


def limits_digest(cpu_limits: Mapping[str, float]) -> str:
    """sha256 of the per-job limits (a run's identity holds this, its manifest the limits themselves)."""
    return hashlib.sha256(json.dumps(sorted(cpu_limits.items())).encode()).hexdigest()
