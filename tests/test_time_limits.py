"""Per-problem CPU limits (sandbox/time_limits.py, gen's cache of them, Job.cpu_s in the sandbox).

No timed assertions: CPU limits are checked by relations ("below cpu_timeout_s", "at least factor x the burn a
reference does by construction"), and verdicts.
"""

from __future__ import annotations

import json
import math

import pytest

from gen.config import ExecutionConfig
from sandbox import Job, Limits, Outcome, Sandbox
from sandbox.time_limits import derive_limits, limits_digest, measure_references, measurement_key
from tasks.problems import Problem, problem_set_fingerprint

LIMITS = Limits(cpu_s=2.0, wall_s=10.0)
TEST = "def check(candidate):\n    assert candidate(1) == 1\n"
PROMPT = "def f(x):\n    \"\"\"Return x.\"\"\"\n"
BURN_S = 0.05  # CPU a burning reference spends by construction (it spins on process_time)
LOOP = PROMPT + "    while True:\n        pass\n"


def problem(pid: str, reference: str | None = PROMPT + "    return x\n") -> Problem:
    return Problem(id=pid, prompt=PROMPT, entry_point="f", test=TEST, reference=reference)


def burner(pid: str = "t/burn", burn_s: float = BURN_S) -> Problem:
    return problem(pid, "import time\n" + PROMPT + "    t = time.process_time()\n"
                        f"    while time.process_time() - t < {burn_s!r}:\n        pass\n    return x\n")


def reference_job(p: Problem) -> Job | None:
    return None if p.reference is None else Job(p.reference, p.test, p.entry_point, p.prompt)


@pytest.fixture(scope="module")
def measured():
    problems = [burner(), problem("t/fast"), problem("t/none", None), problem("t/wrong", PROMPT + "    return 2\n")]
    return problems, measure_references({p.id: reference_job(p) for p in problems}, LIMITS, workers=1)


def derive(m, problems, **kw):
    return derive_limits(m, [p.id for p in problems], cap_s=LIMITS.cpu_s, **kw)


def test_the_limit_is_factor_times_the_references_cpu_above_the_floor(measured):
    problems, m = measured
    limits, kept = derive(m, problems, floor_s=0.01, factor=2.0)
    cpu = max(m["references"]["t/burn"]["cpu_s"])
    assert len(m["references"]["t/burn"]["cpu_s"]) == m["repeats"] == 5
    assert cpu >= BURN_S  # the job's CPU includes the burn, so the robust value does
    assert limits["t/burn"] == math.ceil(max(0.01, 2.0 * cpu) * 1000) / 1000
    assert 2.0 * BURN_S <= limits["t/burn"] < LIMITS.cpu_s
    # a reference that costs ~ms gets the floor
    limits, _ = derive(m, problems, floor_s=0.5, factor=2.0)
    assert limits["t/fast"] == 0.5 and "t/fast" not in kept


def test_an_infinite_loop_ends_at_the_problems_limit_not_at_cpu_timeout(measured):
    problems, m = measured
    limits, _ = derive(m, problems, floor_s=0.01, factor=2.0)
    p = problems[0]
    with Sandbox(workers=1, limits=LIMITS) as box:
        loop, ref = box.run([Job(LOOP, p.test, p.entry_point, p.prompt, cpu_s=limits[p.id]),
                             Job(p.reference, p.test, p.entry_point, p.prompt, cpu_s=limits[p.id])])
    assert loop.outcome is Outcome.TIMEOUT, loop
    assert loop.exec_time_s < LIMITS.cpu_s / 2, loop  # the CPU it used (not wall time) is far below cpu_timeout
    assert f"CPU limit {limits[p.id]:g}s" in loop.error_message
    assert ref.passed, ref  # the reference itself, right after, under its own limit


def test_problems_without_a_passing_reference_keep_cpu_timeout(measured):
    problems, m = measured
    limits, kept = derive(m, problems, floor_s=0.01, factor=2.0)
    assert limits["t/none"] == limits["t/wrong"] == LIMITS.cpu_s
    assert kept["t/none"] == "no reference solution"
    assert kept["t/wrong"].startswith("reference ASSERTION_FAIL"), kept
    assert set(kept) == {"t/none", "t/wrong"}
    with pytest.raises(ValueError, match="t/other"):  # a measurement of another set is refused, not guessed at
        derive(m, problems + [problem("t/other")], floor_s=0.01, factor=2.0)


def test_the_measurement_key_follows_references_and_limits():
    def key(problems, limits=LIMITS):
        return measurement_key(problem_set_fingerprint(problems, with_reference=True), limits)

    a = [problem("t/a"), problem("t/b")]
    assert key(a) == key(list(reversed(a)))
    assert key(a) != key([problem("t/a"), problem("t/b", PROMPT + "  return x\n")])
    assert key(a) != key([problem("t/a"), problem("t/b", None)])
    assert key([problem("t/a", "")]) != key([problem("t/a", None)])
    assert key(a) != key(a, Limits(cpu_s=3.0, wall_s=10.0))


def test_a_cached_measurement_is_reused_and_a_changed_set_is_measured_again(tmp_path, monkeypatch):
    import sandbox.time_limits as tl
    from gen.run import problem_time_limits

    monkeypatch.setenv("PAIRLOOP_CACHE", str(tmp_path))
    calls = []
    real = tl.measure_references
    monkeypatch.setattr(tl, "measure_references", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ex = ExecutionConfig(workers=1, cpu_timeout_s=2.0, time_floor_s=0.25)
    problems = [problem("t/a"), problem("t/b")]
    first = problem_time_limits(ex, problems)
    assert len(calls) == 1 and first["limits"] == {"t/a": 0.25, "t/b": 0.25}
    assert first["limits_sha256"] == limits_digest(first["limits"])
    (cached,) = (tmp_path / "reference-cpu").glob("*.json")
    assert json.loads(cached.read_text())["key"] == first["measurement"] == cached.stem
    assert problem_time_limits(ex, problems) == first and len(calls) == 1  # hit: nothing measured
    assert problem_time_limits(ExecutionConfig(workers=1, cpu_timeout_s=2.0, time_factor=8.0), problems)[
        "measurement"] == first["measurement"] and len(calls) == 1  # floor/factor apply to the same measurement
    problem_time_limits(ex, [problem("t/a"), burner("t/b")])
    assert len(calls) == 2  # an edited reference is another problem set
    assert problem_time_limits(ExecutionConfig(time_limit="fixed"), problems) is None and len(calls) == 2


@pytest.mark.parametrize("field, value, cpu_timeout_s", [
    ("time_factor", 1.0, 5.0), ("time_factor", 0.5, 5.0), ("time_floor_s", 0.0, 5.0), ("time_floor_s", -1.0, 5.0),
    ("time_floor_s", 6.0, 5.0), ("time_limit", "adaptive", 5.0),
])
def test_bad_time_limit_settings_name_the_field_and_value(field, value, cpu_timeout_s):
    with pytest.raises(ValueError, match=rf"execution\.{field}") as e:
        ExecutionConfig(**{field: value, "cpu_timeout_s": cpu_timeout_s})
    assert str(value) in str(e.value), e.value


def test_a_floor_above_cpu_timeout_is_fine_with_fixed_limits():
    assert ExecutionConfig(time_limit="fixed", cpu_timeout_s=0.5).time_floor_s > 0.5


@pytest.mark.parametrize("cpu_s", [0, -1.0, 2.5, True, float("nan"), "1"])
def test_a_jobs_cpu_limit_must_be_within_the_pools(cpu_s):
    with Sandbox(workers=1, limits=LIMITS) as box:
        with pytest.raises(ValueError, match=r"jobs\[1\]\.cpu_s"):
            box.run([Job(PROMPT + "    return x\n", TEST, "f"), Job(PROMPT + "    return x\n", TEST, "f", cpu_s=cpu_s)])


def test_gen_labels_each_problems_jobs_with_its_limit():
    """gen's executor hands each job its problem's limit (ctx["cpu_limits"], what run_generations puts there)."""
    from gen.plan import Request, Unit
    from gen.run import _execute_unit

    p, q = burner("t/x"), problem("t/y")
    unit = Unit("u0", (Request("t/x", 0, 1, 7), Request("t/y", 0, 1, 9)))
    outputs = [[{"text": "    while True:\n        pass\n", "tokens": 5, "finish_reason": "stop",
                 "cumulative_logprob": None}]] * 2
    ctx = {"run_id": "r", "seed": 0, "model": "m", "adapter": None, "prompts": {"t/x": PROMPT, "t/y": PROMPT},
           "cpu_limits": {"t/x": 0.1}}
    with Sandbox(workers=1, limits=Limits(cpu_s=0.6, wall_s=10.0)) as box:
        rows = _execute_unit(box, {"t/x": p, "t/y": q}, "base", unit, outputs, ctx)
    assert [r["outcome"] for r in rows] == ["TIMEOUT", "TIMEOUT"], rows
    assert "CPU limit 0.1s" in rows[0]["error_message"] and "CPU limit 0.6s" in rows[1]["error_message"], rows
    assert rows[0]["exec_time_s"] < 0.3 < rows[1]["exec_time_s"], rows
