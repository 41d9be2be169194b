"""Forgeries of a PASS by code running inside the job: none may score PASS, in full and in user-namespace mode.

Each program defines a *wrong* `square`, so only a forged verdict could make it pass. The user-namespace mode
(what a non-root node gets: jobs share the fork server's uid, capabilities dropped) is forced here, as root, with
`Sandbox(_force_userns=True)`.
"""

from __future__ import annotations

import pytest

from sandbox import Job, Limits, Outcome, Sandbox

LIMITS = Limits(cpu_s=0.5, wall_s=3.0, memory_mb=1024, file_size_mb=8, max_procs=16, max_output_bytes=256)
SQUARE_TEST = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
WRONG = "def square(x):\n    return x + 1\n"
ISCLOSE_TEST = ("def check(candidate):\n    import math\n    assert math.isclose(candidate(3), 9)\n"
                "    assert math.isclose(candidate(-2), 4)\n")

# Walk every frame above the program's own and commit a verdict with whatever the harness keeps there.
FRAME_WALK = """
import sys
f = sys._getframe()
while f is not None:
    loc = f.f_locals
    harness = loc.get('self')
    if 'nonce' in loc and hasattr(harness, '_finish'):
        harness._finish(loc['nonce'], None, 2, 'PASS')
    f = f.f_back
"""

# Reopen every pipe write end any process holds (the fork server's protocol pipe among them) through /proc and
# write a PASS result frame for job 0 in each framing the harness has used (marshal, JSON).
PIPE_FORGERY = """
import json, marshal, os
fields = (0, 'PASS', None, None, None, 0.0, '')
bodies = [marshal.dumps(fields), json.dumps(list(fields)).encode()]
for pid in os.listdir('/proc'):
    if not pid.isdigit():
        continue
    try:
        fds = os.listdir(f'/proc/{pid}/fd')
    except OSError:
        continue
    for fd in fds:
        path = f'/proc/{pid}/fd/{fd}'
        try:
            if not os.readlink(path).startswith('pipe:'):
                continue
            with open(f'/proc/{pid}/fdinfo/{fd}') as info:
                flags = int(info.read().split('flags:')[1].split()[0], 8)
            if flags & 3 != os.O_WRONLY:
                continue
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except (OSError, IndexError, ValueError):
            continue
        print('reopened', pid, 'me' if int(pid) == os.getpid() else 'other')
        for body in bodies:
            try:
                os.write(w, len(body).to_bytes(4, 'big') + body)
            except OSError:
                pass
        os.close(w)
"""


@pytest.fixture(scope="module", params=["full", "userns", "full, planned", "userns, planned"])
def box(request):
    """Each mode call by call, and with call plans: a right answer passed each test first, so every job of these
    tests finds the test's calls in its pipe before it starts (tests/test_sandbox_plans.py)."""
    userns = request.param.startswith("userns")
    with Sandbox(workers=1, limits=LIMITS, _force_userns=userns) as sandbox:
        if userns:
            assert sandbox.isolation.user_namespace and not sandbox.isolation.unprivileged_uid, sandbox.isolation
        else:
            assert sandbox.isolation.unprivileged_uid, sandbox.isolation
        if request.param.endswith("planned"):
            right = sandbox.run([Job("def square(x):\n    return x * x\n", t, "square") for t in (SQUARE_TEST, ISCLOSE_TEST)])
            assert all(r.passed for r in right), right
        yield sandbox


@pytest.mark.parametrize("where", ["import", "call"])
def test_frame_walk_forgery_is_not_pass(box, where):
    if where == "import":
        program = FRAME_WALK + WRONG
    else:
        body = "".join("    " + line + "\n" for line in FRAME_WALK.strip().splitlines())
        program = "def square(x):\n" + body + "    return x + 1\n"
    results = box.run([Job(program, SQUARE_TEST, "square")] + [Job(WRONG, SQUARE_TEST, "square")] * 2)
    # The walk finds only the job process's own harness (nothing there can say PASS): the wrong answer fails.
    assert [r.outcome for r in results] == [Outcome.ASSERTION_FAIL] * 3, results


def test_protocol_pipe_forgery_is_not_pass(box):
    # The forged frames, if any reached a reader, must not be pinned on this job or on the next ones either.
    results = box.run([Job(PIPE_FORGERY + WRONG, SQUARE_TEST, "square")] + [Job(WRONG, SQUARE_TEST, "square")] * 3)
    # At most its own reply pipe reopens (where it shares our uid): what it writes there is a malformed answer.
    assert "other" not in results[0].output, results[0]
    assert results[0].outcome in (Outcome.ASSERTION_FAIL, Outcome.CRASHED), results[0]
    assert [r.outcome for r in results[1:]] == [Outcome.ASSERTION_FAIL] * 3, results


@pytest.mark.parametrize("name, program", [
    ("always-equal object", "class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): "
     "return False\n    __hash__ = object.__hash__\ndef square(x):\n    return Any()\n"),
    ("always-equal float subclass", "class F(float):\n    def __eq__(self, other): return True\n"
     "def square(x):\n    return F(x + 1)\n"),
    ("monkeypatched math.isclose", "import math\nmath.isclose = lambda *a, **k: True\n" + WRONG),
    ("sys.settrace that skips the assertions",
     "import sys, threading\ndef skip(frame, event, arg):\n    if event == 'line' and 'assert' in str(frame.f_code):\n"
     "        frame.f_lineno = frame.f_code.co_firstlineno + 10\n    return skip\n"
     "sys.settrace(skip)\nthreading.settrace(skip)\n" + WRONG),
    ("gc.get_objects() scan for the harness", "import gc\nfor o in gc.get_objects():\n"
     "    finish = getattr(type(o), '_finish', None)\n    if finish is not None:\n"
     "        for n in [x for x in gc.get_objects() if type(x) is bytes and len(x) == 16]:\n"
     "            try: finish(o, n, None, 2, 'PASS')\n            except Exception: pass\n" + WRONG),
])
def test_in_job_tricks_never_pass(box, name, program):
    test = ISCLOSE_TEST if "isclose" in name else SQUARE_TEST
    [result] = box.run([Job(program, test, "square")])
    assert result.outcome.is_model_failure, (name, result)


@pytest.mark.parametrize("where, program", [
    ("at import", "import os\nos._exit(0)\n" + WRONG),
    ("in the first call", "import os\ndef square(x):\n    os._exit(0)\n"),
    ("in the second call, after a right first answer", "import os\ndef square(x):\n    if x == -2:\n"
     "        os._exit(0)\n    return x * x\n"),
    ("in an atexit hook", "import atexit, os\natexit.register(os._exit, 0)\n" + WRONG),
    ("in a thread, while the test runs", "import os, threading, time\n"
     "threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
     "def square(x):\n    time.sleep(0.2)\n    return x + 1\n"),
    ("when the result is collected", "import os\nclass R(int):\n    def __del__(self): os._exit(0)\n"
     "def square(x):\n    return R(x + 1)\n"),
])
def test_os_exit_at_any_point_never_passes(box, where, program):
    [result] = box.run([Job(program, SQUARE_TEST, "square")])
    assert result.outcome in (Outcome.CRASHED, Outcome.ASSERTION_FAIL), (where, result)


def test_a_program_that_restates_a_prompt_helper_wrongly_does_not_pass(box):
    # HumanEval/32's tests call `poly` from the prompt. A program whose `poly` is always 0 makes any find_zero
    # "pass" a test that used the program's helpers; the judge uses the prompt's own `poly`.
    from tasks.problems import load_problems

    p = next(p for p in load_problems("humaneval") if p.id == "HumanEval/32")
    wrong = p.prompt.replace("    return sum(", "    return 0 * sum(") + "    return 0.0\n"
    assert wrong != p.prompt + "    return 0.0\n"
    right, restated = box.run([Job(p.reference, p.test, p.entry_point, p.prompt),
                               Job(wrong, p.test, p.entry_point, p.prompt)])
    assert (right.outcome, restated.outcome) == (Outcome.PASS, Outcome.ASSERTION_FAIL), (right, restated)


def test_a_test_that_needs_a_prompt_helper_without_the_prompt_is_an_infra_error(box):
    from tasks.problems import load_problems

    p = next(p for p in load_problems("humaneval") if p.id == "HumanEval/32")
    [result] = box.run([Job(p.reference, p.test, p.entry_point)])
    assert (result.outcome, result.error_type) == (Outcome.INFRA_ERROR, "test-name"), result
    assert "poly" in result.error_message, result
