"""Call plans (sandbox/_worker.py, Judge): once a job of a problem has passed, the next jobs of that problem get the
test's calls written up front and answer them without a round trip each. The verdicts must be exactly those of
call-by-call execution: the job still only answers, the judge still compares, and a test whose calls differ from
the plan is redone call by call in a fresh job (the planned job has already run calls the test did not make).
"""

from __future__ import annotations

import pytest

from sandbox import Job, Limits, Outcome, Sandbox
from tasks.problems import load_problems

LIMITS = Limits(cpu_s=4.0, wall_s=8.0, memory_mb=1024, file_size_mb=8, max_procs=16, max_output_bytes=256)
IDENTITY = "def f(x):\n    return x\n"


@pytest.fixture()
def box():
    with Sandbox(workers=1, limits=LIMITS) as sandbox:  # one judge: the plan a job leaves is the next job's
        yield sandbox


def verdict(r):
    return r.outcome, r.phase, r.error_type


def test_a_test_whose_calls_change_is_redone_call_by_call(box):
    """Random inputs: the plan holds another job's numbers. A program that remembers its first argument is right
    under call-by-call execution (PASS); answering the planned call first would make it wrong."""
    test = ("import random\n\ndef check(candidate):\n    x = random.randrange(1 << 40)\n"
            "    assert candidate(x) == x\n    assert candidate(x + 1) == x\n")
    remember_first = "seen = []\n\ndef f(x):\n    seen.append(x)\n    return seen[0]\n"
    first, second, third = box.run([Job(remember_first, test, "f")] * 3)
    assert [r.outcome for r in (first, second, third)] == [Outcome.PASS] * 3, (first, second, third)


def test_a_failure_before_the_last_planned_call_ends_the_job_at_once(box):
    """The job would spend its whole CPU limit in a later planned call the test never reaches: the judge has its
    verdict at the first wrong answer and the job is killed (call by call it would never have started it)."""
    test = "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 2\n"
    wrong_then_loop = "def f(x):\n    if x == 1:\n        return 0\n    while True:\n        pass\n"
    passed, failed = box.run([Job(IDENTITY, test, "f"), Job(wrong_then_loop, test, "f")])
    assert passed.outcome is Outcome.PASS
    assert failed.outcome is Outcome.ASSERTION_FAIL, failed
    assert failed.exec_time_s < LIMITS.cpu_s / 4, failed  # killed, not run to its CPU limit


def test_a_plan_longer_than_the_pipe_takes_is_a_prefix_and_the_rest_goes_call_by_call(box):
    test = ("def check(candidate):\n    for i in range(300):\n"
            "        assert candidate('x' * 400 + str(i)) == 'x' * 400 + str(i)\n")
    wrong_last = "def f(s):\n    return s if not s.endswith('299') else ''\n"
    results = box.run([Job(IDENTITY, test, "f"), Job(IDENTITY, test, "f"), Job(wrong_last, test, "f")])
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.PASS, Outcome.ASSERTION_FAIL], results


def wrong_from_third_call(p) -> str:
    """The reference, answering None from its third call on: wrong in the middle of a test's calls."""
    e = p.entry_point
    return (f"{p.reference}\n_ref = {e}\n_n = [0]\n\ndef {e}(*a, **k):\n    _n[0] += 1\n"
            f"    return _ref(*a, **k) if _n[0] < 3 else None\n")


def test_humaneval_verdicts_with_plans_are_those_without():
    """Every HumanEval problem: references pass (their plans recorded), then wrong programs get the verdict they
    get call by call (the same programs under a test text never seen before: no plan)."""
    problems = load_problems("humaneval")
    with Sandbox(workers=2, limits=Limits(cpu_s=3.0, wall_s=8.0)) as box:
        refs = box.run([Job(p.reference, p.test, p.entry_point, p.prompt) for p in problems] * 2)
        assert all(r.passed for r in refs), [r for r in refs if not r.passed]
        programs = [(p, prog) for p in problems for prog in (wrong_from_third_call(p), p.prompt + "    return 0\n")]
        planned = box.run([Job(prog, p.test, p.entry_point, p.prompt) for p, prog in programs])
        fresh = box.run([Job(prog, p.test + "\n# unplanned\n", p.entry_point, p.prompt) for p, prog in programs])
    differ = [(p.id, verdict(a), verdict(b)) for (p, _), a, b in zip(programs, planned, fresh)
              if verdict(a) != verdict(b)]
    assert not differ, differ
    assert sum(not r.passed for r in planned) > 250  # the wrong programs are mostly wrong: they tested something


def test_a_job_that_reads_its_planned_calls_ahead_gains_nothing():
    """The plan puts the test's arguments (never its expected answers) in the job's pipe before the test asks.
    A program that takes them out of the pipe at import and answers them itself, before it is even defined, breaks
    the protocol (CRASHED); one that just swallows them never answers and runs into the wall-clock limit."""
    square_test = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
    steal = ("import os, json\nraw = os.read(3, 1 << 16)\nframes = []\nwhile raw:\n"
             "    n = int.from_bytes(raw[:4], 'big'); frames.append(json.loads(raw[4:4 + n])); raw = raw[4 + n:]\n")
    answer_wrongly = steal + ("for args, kwargs in frames:\n"
                              "    body = json.dumps(['ret', args[0] + 1]).encode()\n"
                              "    os.write(4, len(body).to_bytes(4, 'big') + body)\n"
                              "def square(x):\n    return x + 1\n")
    swallow = steal + "def square(x):\n    return x * x\n"
    with Sandbox(workers=1, limits=Limits(cpu_s=1.0, wall_s=1.5)) as box:
        right = "def square(x):\n    return x * x\n"
        results = box.run([Job(right, square_test, "square"), Job(answer_wrongly, square_test, "square"),
                           Job(swallow, square_test, "square"), Job(right, square_test, "square")])
    assert results[0].passed and results[3].passed, results
    assert results[1].outcome is Outcome.CRASHED, results[1]
    assert results[2].outcome in (Outcome.TIMEOUT, Outcome.CRASHED), results[2]


@pytest.mark.parametrize("plans", [True, False])
def test_plans_are_used_once_a_job_passed_and_only_then(plans):
    """The planned calls are in the pipe before the program runs (a job can see them: select on fd 3), after a
    pass and not before; `_call_plans=False` (the benchmark's other arm) never plans."""
    test = "def check(candidate):\n    assert candidate(3) == 3\n"
    probe = ("import select\nprint('planned' if select.select([3], [], [], 0.5)[0] else 'none')\n"
             "def f(x):\n    return x\n")
    with Sandbox(workers=1, limits=LIMITS, _call_plans=plans) as box:
        results = box.run([Job(probe, test, "f"), Job(probe, test, "f")])
    assert [r.outcome for r in results] == [Outcome.PASS] * 2, results
    assert [r.output.strip() for r in results] == ["none", "planned" if plans else "none"], results


def test_a_plan_written_after_its_job_ended_is_not_a_harness_fault():
    """A job that fails at definition time can be gone (every read end of its call pipe closed) before the judge
    writes its plan: the write breaks the pipe. That is the job's own ending (its SYNTAX_ERROR stands), not an
    INFRA_ERROR (seen in a fresh-clone `make test`: "call pipe took 0 of 22 planned bytes"). A pipe that takes
    less than it holds is still ours."""
    import os

    from sandbox._worker import _write_plan

    r, w = os.pipe()
    os.close(r)
    assert _write_plan(w, b"x" * 22) == (False, None)
    os.close(w)
    r, w = os.pipe()
    assert _write_plan(w, b"x" * 22) == (True, None)
    assert os.read(r, 64) == b"x" * 22
    too_big = b"x" * (1 << 20)  # more than a default pipe holds: refused whole, and ours
    written, fault = _write_plan(w, too_big)
    assert not written and fault == f"call pipe took 0 of {len(too_big)} planned bytes"
    os.close(r)
    os.close(w)
