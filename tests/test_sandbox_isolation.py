"""What the sandbox reports about itself and what a job can reach, in full and in user-namespace mode; jobs of
any size; INFRA_ERROR only for our faults, with a cause.

User-namespace mode (what a non-root node gets) is forced here, as root, with `Sandbox(_force_userns=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest

from sandbox import Job, Limits, Outcome, Sandbox
from sandbox import _worker as worker

LIMITS = Limits(cpu_s=0.5, wall_s=3.0, memory_mb=1024, file_size_mb=8, max_procs=16, max_output_bytes=512)
SQUARE_TEST = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
SQUARE = "def square(x):\n    return x * x\n"


@pytest.fixture(scope="module", params=["full", "userns"])
def box(request):
    with Sandbox(workers=1, limits=LIMITS, _force_userns=request.param == "userns") as sandbox:
        yield sandbox


def run_one(box, program, test=SQUARE_TEST):
    [result] = box.run([Job(program, test, "square")])
    return result


def test_isolation_is_plain_data_and_userns_mode_reports_itself_incomplete(box):
    iso = box.isolation
    data = json.loads(json.dumps(dataclasses.asdict(iso)))
    assert data["complete"] == iso.complete and data["missing"] == list(iso.missing), data
    if iso.user_namespace:  # jobs share the fork server's uid there: not complete, and it says what is missing
        assert (iso.complete, iso.missing) == (False, ("unprivileged_uid",)), iso
    else:
        assert (iso.complete, iso.missing) == (True, ()), iso


def test_job_cannot_reach_the_fork_server_or_the_callers_environment(box):
    # pid 1 is the fork server (non-dumpable); the caller (this pytest process) is outside the job's pid
    # namespace. Neither's descriptors, memory or environment can be opened.
    targets = ["/proc/1/fd/0", "/proc/1/environ", "/proc/1/mem", f"/proc/{os.getpid()}/environ",
               f"/proc/{os.getppid()}/environ"]
    program = ("import os\nfor path in %r:\n    try:\n        open(path, 'rb').read(1)\n        print('READ', path)\n"
               "    except OSError as e:\n        print(type(e).__name__)\n" % targets) + SQUARE
    result = run_one(box, program)
    assert result.passed and "READ" not in result.output and result.output.count("\n") == len(targets), result


def test_seccomp_denies_what_a_job_never_needs_and_allows_threads_and_processes(box):
    program = """
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(ret):
    return 'ok' if ret == 0 else os.strerror(ctypes.get_errno())
print('ptrace', errno_of(libc.ptrace(0, 0, 0, 0)))  # PTRACE_TRACEME
print('unshare', errno_of(libc.unshare(0x10000000)))  # CLONE_NEWUSER
print('keyctl', errno_of(libc.syscall(250, 0, 0, 0, 0)))
print('bpf', errno_of(libc.syscall(321, 0, 0, 0)))
print('mount', errno_of(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))
t = threading.Thread(target=lambda: None); t.start(); t.join()
print('thread ok', subprocess.run(['/bin/true']).returncode)
""" + SQUARE
    result = run_one(box, program)
    assert box.isolation.seccomp, box.isolation
    denied = "Operation not permitted"
    assert result.passed and result.output == (f"ptrace {denied}\nunshare {denied}\nkeyctl {denied}\nbpf {denied}\n"
                                               f"mount {denied}\nthread ok 0\n"), result


def test_process_limit_counts_threads(box):
    if not box.isolation.unprivileged_uid:
        pytest.skip("jobs keep root's uid in forced user-namespace mode here, and root is exempt from RLIMIT_NPROC")
    program = ("import threading, time\nstarted = 0\ntry:\n    for _ in range(64):\n"
               "        threading.Thread(target=time.sleep, args=(0.3,), daemon=True).start()\n        started += 1\n"
               "except RuntimeError:\n    pass\nprint(started)\n" + SQUARE)
    result = run_one(box, program)
    # The kernel counts the job's tasks (its main thread, a helper or two of the runtime) against max_procs.
    assert result.passed and LIMITS.max_procs - 4 <= int(result.output) <= LIMITS.max_procs + 4, result


def test_user_task_count_counts_threads():
    # Without a uid of its own, RLIMIT_NPROC is set from this count: the kernel counts threads, so must we.
    stop = threading.Event()
    before = worker._user_task_count(os.getuid())
    threads = [threading.Thread(target=stop.wait) for _ in range(64)]
    for t in threads:
        t.start()
    try:
        during = worker._user_task_count(os.getuid())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert during - before >= 48, (before, during)  # other processes of this uid come and go meanwhile


@pytest.mark.parametrize("size", [70_000, 1_000_000])
def test_large_programs_run_with_one_worker(size):
    # A job frame bigger than a pipe's 64 KiB is written as the worker drains it (write-readiness of the write
    # end), not only when some other worker happens to answer.
    padding = "# " + "x" * 98 + "\n"
    program = padding * (size // len(padding) + 1) + SQUARE
    assert len(program) >= size
    with Sandbox(workers=1, limits=LIMITS) as box:
        results = box.run([Job(program, SQUARE_TEST, "square")] * 3)
    assert [r.outcome for r in results] == [Outcome.PASS] * 3, results


def test_large_arguments_and_results_round_trip(box):
    test = ("def check(candidate):\n    xs = list(range(200_000))\n    assert candidate(xs) == xs + xs\n"
            "    assert candidate('ab' * 100_000) == 'ab' * 200_000\n")
    [result] = box.run([Job("def square(x):\n    return x * 2\n", test, "square")])
    assert result.passed, result


@pytest.mark.parametrize("value", [
    "(1, [2.5, -0.0], {'a': (None, True)}, {3, 4}, frozenset({5}), b'\\x00\\xff', bytearray(b'z'), 2 + 3j)",
    "10 ** 5000", "-(2 ** 70)", "float('inf')", "'\\ud800 surrogate'", "{(1, 2): 'tuple key', 7: 'int key'}",
    "__import__('collections').Counter('abca')", "__import__('collections').OrderedDict(a=1)",
])
def test_plain_values_round_trip_exactly(box, value):
    # Same value, same type (a dict subclass comes back as a dict, which compares the same), and the same
    # element types and float signs all the way down (what repr shows; huge ints compared without repr).
    test = (f"def check(candidate):\n    v = {value}\n    r = candidate(v)\n"
            f"    assert r == v and type(r) in (type(v), dict)\n"
            f"    if not isinstance(v, int):\n        assert repr(r) == repr(dict(v) if isinstance(v, dict) else v)\n")
    [result] = box.run([Job("def square(x):\n    return x\n", test, "square")])
    assert result.passed, (value, result)


def test_unsendable_test_argument_is_an_infra_error_with_its_cause(box):
    test = "def check(candidate):\n    assert candidate(lambda: 1) == 1\n"
    [result] = box.run([Job(SQUARE, test, "square")])
    assert (result.outcome, result.error_type) == (Outcome.INFRA_ERROR, "test-input"), result


def test_an_exception_keeps_its_category_and_the_test_may_catch_it(box):
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n        assert False, 'no error'\n"
            "    except ValueError:\n        pass\n    candidate(0)\n")
    program = ("class Negative(ValueError):\n    pass\ndef square(x):\n    if x < 0:\n        raise Negative('neg')\n"
               "    return {}[x]\n")
    [result] = box.run([Job(program, test, "square")])
    assert (result.outcome, result.phase.value, result.error_type, result.error_message) == \
        (Outcome.KEY_ERROR, "test", "KeyError", "0"), result
