"""Execute untrusted programs against tests and label every run with one outcome.

    with Sandbox(limits=Limits(cpu_s=5)) as box:
        results = box.run([Job(program, test, entry_point, prompt), ...], on_result=bar.update)  # input order

A pool of warm workers, one per core (sandbox/_worker.py, a fresh interpreter each). A worker is a *judge* and a
*fork server*, neither of which ever runs model code. The fork server (pid 1 of the jobs' pid namespace, in
private mount, network and ipc namespaces; non-dumpable) forks one job process per job, which switches to a uid
of its own, sets rlimits, inherits a seccomp filter, runs the program (phase "definition") and then answers
calls of the entry point (phase "test") in a tagged plain-data encoding. The judge (outside the jobs' pid
namespace) runs the test code beside the problem's own prompt helpers (`Job.prompt`), with `candidate` a proxy
for those calls, and decides the verdict: PASS means the test's own `check` returned, in the judge, with every
call answered. Nothing the job process does can say PASS; exits, signals, printed text, frame walks, memory
scans, patched modules or builtins, trace hooks and always-equal objects have nothing to reach.

What it does not protect against (details in docs/sandbox.md): reading host files, the problem set on disk
included; per-job (not per-process-tree) CPU and memory; kernel exploits through allowed system calls. Without
root the isolation degrades (user-namespace mode: jobs share the worker's uid; no namespaces at all: host files
writable, network, the caller's /proc/<pid>/environ readable): see `Sandbox.isolation`; a warning is issued.

This module imports nothing from the project, so any stage can use it.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import selectors
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence


class Outcome(str, enum.Enum):
    """The closed set of verdicts. INFRA_ERROR is a fault of the harness, never the model's failure.

    TRUNCATED is never returned by the executor: it is the label of a completion the engine cut at its token limit
    (finish reason "length") whose program does not parse. The executor says SYNTAX_ERROR for it, but the model
    wrote no syntax error; it did not finish within the budget (`label`, applied by gen where rows are written)."""

    PASS = "PASS"
    SYNTAX_ERROR = "SYNTAX_ERROR"
    TRUNCATED = "TRUNCATED"
    NAME_ERROR = "NAME_ERROR"
    IMPORT_ERROR = "IMPORT_ERROR"
    TYPE_ERROR = "TYPE_ERROR"
    ASSERTION_FAIL = "ASSERTION_FAIL"
    INDEX_ERROR = "INDEX_ERROR"
    KEY_ERROR = "KEY_ERROR"
    VALUE_ERROR = "VALUE_ERROR"
    ATTRIBUTE_ERROR = "ATTRIBUTE_ERROR"
    ZERO_DIVISION = "ZERO_DIVISION"
    RECURSION = "RECURSION"
    OTHER_EXCEPTION = "OTHER_EXCEPTION"
    TIMEOUT = "TIMEOUT"
    MEMORY = "MEMORY"
    CRASHED = "CRASHED"
    NO_CODE = "NO_CODE"
    INFRA_ERROR = "INFRA_ERROR"

    @property
    def is_model_failure(self) -> bool:
        return self not in (Outcome.PASS, Outcome.INFRA_ERROR)


def label(outcome: str, finish_reason: str | None, phase: str | None, program: str | None) -> str:
    """A sample's outcome name from the executor's verdict and why the generation stopped: TRUNCATED when the engine
    cut the completion at its token limit, the executor said SYNTAX_ERROR while defining the program, and the
    program itself does not compile (checked here: compiling runs none of it). A program that compiles and then
    raises SyntaxError on its own (`eval("(")`, `raise SyntaxError`) stays the model's SYNTAX_ERROR, cut or not.
    Rows are labelled once, by gen as it writes them; rows written before TRUNCATED existed keep SYNTAX_ERROR."""
    if (outcome != Outcome.SYNTAX_ERROR.value or finish_reason != "length" or phase != Phase.DEFINITION.value
            or program is None or "\0" in program):  # a null byte is the model's own syntax error
        return outcome
    try:
        compile(program, "<program>", "exec", dont_inherit=True)
    except SyntaxError:
        return Outcome.TRUNCATED.value
    except Exception:  # noqa: BLE001 (a null byte, a parser limit: the executor's verdict stands)
        return outcome
    return outcome


class Phase(str, enum.Enum):
    DEFINITION = "definition"  # while executing the program itself (module import time)
    TEST = "test"  # while running the problem's tests against it


@dataclass(frozen=True)
class Job:
    program: str  # the full program: prompt + completion as extracted; None or blank -> NO_CODE
    test: str  # test code that defines `check(candidate)`
    entry_point: str  # name of the function `check` is called with
    # The problem's prompt (trusted): the test runs beside its helpers (HumanEval/32's tests call `poly`), never
    # the program's versions of them. None: the test gets no helpers, and one that needs them is INFRA_ERROR.
    prompt: str | None = None
    # This job's CPU-time limit, at most the pool's Limits.cpu_s (None: that). A per-problem limit derived from the
    # problem's reference solution (sandbox/time_limits.py) ends an infinite loop long before the pool-wide one.
    cpu_s: float | None = None


@dataclass(frozen=True)
class ExecResult:
    outcome: Outcome
    phase: Phase | None  # None for PASS, NO_CODE, INFRA_ERROR
    error_type: str | None  # exception class name, e.g. "ZeroDivisionError"; signal name for a crash
    error_message: str | None  # short, truncated
    exec_time_s: float  # CPU seconds used by the job
    output: str = ""  # the first Limits.max_output_bytes of what the program printed (stdout and stderr)

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0  # CPU-time limit: the primary timeout (a busy machine can't cause a false TIMEOUT)
    wall_s: float = 30.0  # wall-clock backstop, for jobs that sleep or block
    memory_mb: int = 2048  # address-space limit per process
    file_size_mb: int = 64  # largest file a job may write; also the size of its private /tmp
    max_procs: int = 32  # processes + threads of one job (needs the uid switch, i.e. root)
    max_output_bytes: int = 2048  # printed output kept per job

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")
        for name in ("memory_mb", "file_size_mb", "max_procs", "max_output_bytes"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"Limits.{name} must be an int, got {getattr(self, name)!r}")
        if self.wall_s < self.cpu_s:
            raise ValueError(f"Limits.wall_s ({self.wall_s!r}) must be >= Limits.cpu_s ({self.cpu_s!r})")
        if self.memory_mb < 64:  # the limit applies to the fork server too (~30 MB of address space)
            raise ValueError(f"Limits.memory_mb must be >= 64, got {self.memory_mb!r}")
        if self.max_output_bytes > 1 << 20:
            raise ValueError(f"Limits.max_output_bytes must be <= 1 MiB, got {self.max_output_bytes!r}")


@dataclass(frozen=True)
class Isolation:
    """What the workers actually got on this machine (they try everything and report). Plain data:
    `dataclasses.asdict(box.isolation)` is JSON-serialisable, `complete` and `missing` included."""

    unprivileged_uid: bool  # jobs run as a uid of their own (not the judge's or fork server's), NPROC exact
    user_namespace: bool  # used instead of root to create the namespaces below (jobs then share our uid)
    mount_namespace: bool  # host filesystem read-only, private tmpfs /tmp, /dev/shm and /run hidden
    pid_namespace: bool  # jobs see only their own processes; all of them die with the job
    private_proc: bool  # /proc shows only the jobs' pid namespace: no /proc/<pid>/environ of any host process
    network_namespace: bool  # no network at all (not even loopback)
    ipc_namespace: bool  # private SysV IPC / POSIX message queues
    seccomp: bool  # ptrace, mount, bpf, keyctl, unshare, ... denied to jobs (list: sandbox._worker.SECCOMP_DENIED)
    notes: tuple[str, ...] = ()
    complete: bool = field(init=False)  # every layer above (the user namespace is a means, not a layer)
    missing: tuple[str, ...] = field(init=False)  # the layers this machine did not give

    def __post_init__(self) -> None:
        missing = tuple(f.name for f in fields(self) if f.type in (bool, "bool") and f.init
                        and f.name != "user_namespace" and not getattr(self, f.name))
        object.__setattr__(self, "missing", missing)
        object.__setattr__(self, "complete", not missing)


# Modules HumanEval/MBPP-style solutions import; loaded once per worker, so a job's `import` is a dict lookup.
# Not here on purpose: doctest (3.7 MB), unittest (2.5 MB), dataclasses (1.2 MB, pulls in inspect): every byte a
# worker holds is page-table work at each fork, and solutions rarely import them (they cost ~5-30 ms when they do).
# Not threading/queue either (threading's at-fork hook costs ~0.4 ms CPU per job), nor random/statistics (random
# reseeds itself at every fork, ~0.13 ms per job; 4 of 164 HumanEval tests import it and pay ~1 ms instead).
PRELOAD = (
    "math", "cmath", "re", "string", "itertools", "collections", "collections.abc", "functools", "heapq",
    "bisect", "operator", "typing", "hashlib", "fractions", "decimal", "numbers", "copy", "datetime", "time",
    "calendar", "json", "array", "struct", "textwrap", "unicodedata", "enum", "abc", "io", "contextlib", "types",
)

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
_FEATURES = ("setuid", "userns", "mountns", "pidns", "netns", "ipcns", "seccomp")
_UID_BASE = 1 << 30  # jobs run as uid/gid _UID_BASE + random: no such user exists, so nothing on the host is theirs
_DEPTH = 2  # jobs queued per worker, so a worker never waits for the parent between jobs
_START_TIMEOUT_S = 60.0
_GRACE_S = 10.0  # a worker silent for wall_s + this is declared dead


def _infra(cause: str, message: str) -> ExecResult:
    """A fault of ours. `cause` (the result's error_type) is one of: worker-lost (a worker died twice while
    running the job, its own fault: the job itself can only be CRASHED/TIMEOUT/MEMORY), worker-start (no worker
    could be started), and the worker's own: test-code, test-input, test-name, job-setup, fork-server, judge."""
    return ExecResult(Outcome.INFRA_ERROR, None, cause, message[:500], 0.0)


class _Worker:
    """One fork-server process and the parent's view of it (buffers, jobs in flight)."""

    def __init__(self, cfg: dict) -> None:
        # -s -P: no user site-packages, no script dir on sys.path (jobs can't import project files by accident);
        # the environment is ours alone (nothing of the caller's leaks in, e.g. tokens), with a fixed hash seed
        # so set/dict order and therefore verdicts are reproducible.
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-P", _WORKER, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True, start_new_session=True,
            cwd="/", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                          "PYTHONDONTWRITEBYTECODE": "1"})
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.inflight: deque[int] = deque()
        self.deadline: float | None = None
        self.ready: tuple | None = None
        self.dead = False
        self.writing = False  # registered for write-readiness of wfd (a job frame bigger than the pipe)

    def frames(self) -> list:
        out = []
        while len(self.inbuf) >= 4:
            n = int.from_bytes(self.inbuf[:4], "big")
            if len(self.inbuf) < 4 + n:
                break
            out.append(json.loads(bytes(self.inbuf[4:4 + n])))
            del self.inbuf[:4 + n]
        return out

    def await_ready(self, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.rfd, selectors.EVENT_READ)
            while True:
                frames = self.frames()
                if frames:
                    if frames[0][0] != "ready" or len(frames) != 1:
                        raise RuntimeError(f"sandbox worker sent unexpected first frames {frames!r:.300}")
                    self.ready = frames[0]
                    os.set_blocking(self.wfd, False)
                    return self.ready
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"sandbox worker did not start within {timeout:g}s")
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    raise RuntimeError(f"sandbox worker exited during start-up (status {self.proc.wait()}); "
                                       "its stderr is above")
                self.inbuf += chunk

    def kill(self) -> None:
        self.dead = True
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.kill()  # our waiter outside the namespaces; the zygote has it as parent-death signal
        except OSError:
            pass
        self.proc.wait()

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self.proc.stdin.close()  # EOF: the zygote finishes its job and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _stop_all(workers: list) -> None:
    for w in workers:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
    for w in workers:
        w.stop()
    workers.clear()


class Sandbox:
    """A pool of warm fork-server workers. Use as a context manager; `run` never raises for a job's fault.

    `run` may be called from any thread (calls are serialized); the object itself is not picklable: create one
    per process (e.g. inside a Ray actor).
    """

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), *,
                 preload: Sequence[str] = PRELOAD, _disable: frozenset[str] = frozenset(),
                 _force_userns: bool = False, _call_plans: bool = True) -> None:
        """`_disable` (features to skip) and `_force_userns` (the user-namespace path even as root) are for tests:
        they show what the degraded modes give. `_call_plans=False` sends every call of the entry point as its own
        round trip (docs/sandbox.md, "Call plans"): for the benchmark that compares the two."""
        if workers is None:
            workers = len(os.sched_getaffinity(0))
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Sandbox workers must be a positive int, got {workers!r}")
        if not isinstance(limits, Limits):
            raise ValueError(f"Sandbox limits must be a Limits, got {limits!r}")
        unknown = set(_disable) - set(_FEATURES)
        if unknown:
            raise ValueError(f"Sandbox _disable has unknown features {sorted(unknown)}; known: {_FEATURES}")
        self.limits = limits
        self._features = [f for f in _FEATURES if f not in _disable]
        self._preload = list(preload)
        self._force_userns = _force_userns
        self._call_plans = bool(_call_plans)
        self._lock = threading.Lock()
        self._closed = False
        self._uids = secrets.SystemRandom().sample(range(1 << 24), workers)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        try:
            started = [_Worker(self._config(i)) for i in range(workers)]
            self._workers.extend(started)
            readies = [w.await_ready(_START_TIMEOUT_S) for w in started]
        except BaseException:
            self.close()
            raise
        _, features, notes, _ = readies[0]
        self.isolation = Isolation(
            unprivileged_uid="setuid" in features, user_namespace="userns" in features,
            mount_namespace="mountns" in features, pid_namespace="pidns" in features,
            private_proc="privateproc" in features, network_namespace="netns" in features,
            ipc_namespace="ipcns" in features, seccomp="seccomp" in features, notes=tuple(notes))
        if not self.isolation.complete and not _disable:
            warnings.warn(f"sandbox isolation is incomplete on this machine: {self.isolation}", RuntimeWarning,
                          stacklevel=2)

    def _config(self, slot: int) -> dict:
        lim = self.limits
        return {"features": self._features, "preload": self._preload, "uid": _UID_BASE + self._uids[slot],
                "tmpfs_mb": lim.file_size_mb, "force_userns": self._force_userns, "call_plans": self._call_plans,
                "limits": {f.name: getattr(lim, f.name) for f in fields(lim)}}

    @property
    def workers(self) -> int:
        return len(self._workers)

    def run(self, jobs: Sequence[Job], on_result: Callable[[], object] | None = None) -> list[ExecResult]:
        jobs = list(jobs)
        for i, job in enumerate(jobs):
            if not isinstance(job, Job):
                raise ValueError(f"jobs[{i}] must be a Job, got {type(job).__name__}")
            if job.program is not None and not isinstance(job.program, str):
                raise ValueError(f"jobs[{i}].program must be a str or None, got {type(job.program).__name__}")
            if not isinstance(job.test, str):
                raise ValueError(f"jobs[{i}].test must be a str, got {type(job.test).__name__}")
            if not isinstance(job.entry_point, str) or not job.entry_point.isidentifier():
                raise ValueError(f"jobs[{i}].entry_point must be an identifier, got {job.entry_point!r}")
            if job.prompt is not None and not isinstance(job.prompt, str):
                raise ValueError(f"jobs[{i}].prompt must be a str or None, got {type(job.prompt).__name__}")
            if job.cpu_s is not None and (isinstance(job.cpu_s, bool) or not isinstance(job.cpu_s, (int, float))
                                          or not 0 < job.cpu_s <= self.limits.cpu_s):
                raise ValueError(f"jobs[{i}].cpu_s must be a number in (0, Limits.cpu_s={self.limits.cpu_s:g}] or "
                                 f"None, got {job.cpu_s!r}")
        results: list[ExecResult | None] = [None] * len(jobs)
        todo: deque[int] = deque()
        for i, job in enumerate(jobs):
            if job.program is None or not job.program.strip():
                results[i] = ExecResult(Outcome.NO_CODE, None, None, None, 0.0)
            else:
                todo.append(i)
        with self._lock:
            if self._closed:
                raise RuntimeError("Sandbox.run called after close()")
            self._schedule(jobs, todo, results, on_result)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"sandbox: jobs {missing[:10]} ({len(missing)} in all) got no result")
        return results  # type: ignore[return-value]

    def _schedule(self, jobs: list[Job], todo: deque, results: list, on_result) -> None:
        budget = self.limits.wall_s + _GRACE_S
        attempts: dict[int, int] = {}
        remaining = len(todo)
        for slot, w in enumerate(self._workers):  # replace workers lost by an interrupted run
            if w.dead or w.proc.poll() is not None:
                w.kill()
                self._workers[slot] = _Worker(self._config(slot))
                self._workers[slot].await_ready(_START_TIMEOUT_S)
        sel = selectors.DefaultSelector()
        live = list(self._workers)
        for w in live:
            w.inbuf.clear()
            w.outbuf.clear()
            w.inflight.clear()
            w.deadline = None
            w.writing = False
            sel.register(w.rfd, selectors.EVENT_READ, w)

        def finish(i: int, result: ExecResult) -> None:
            nonlocal remaining
            results[i] = result
            remaining -= 1
            if on_result is not None:
                on_result()

        def lost(w: _Worker, why: str, started: bool = True) -> None:
            """A worker died, hung or gave up: requeue what it held (the running job, if it may have started, at
            most twice), start a replacement. A job's own deaths never come here: the worker reports them."""
            sel.unregister(w.rfd)
            if w.writing:
                sel.unregister(w.wfd)
                w.writing = False
            live.remove(w)
            w.kill()
            why = f"{why} (exit status {w.proc.returncode})"
            if w.inflight:
                head = w.inflight.popleft()
                for i in reversed(w.inflight):
                    todo.appendleft(i)
                if started:
                    attempts[head] = attempts.get(head, 0) + 1
                if attempts.get(head, 0) >= 2:
                    finish(head, _infra("worker-lost", f"sandbox worker {why}, twice, while running this job"))
                else:
                    todo.appendleft(head)
            new = None
            try:
                if self._closed or w not in self._workers:
                    raise RuntimeError("sandbox closed")
                slot = self._workers.index(w)
                new = _Worker(self._config(slot))
                self._workers[slot] = new
                new.await_ready(_START_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - reported as INFRA_ERROR below if no worker is left
                if new is not None:
                    new.kill()
                if not live:
                    while todo:
                        finish(todo.popleft(), _infra("worker-start",
                                                      f"sandbox worker {why} and could not be restarted: {e}"))
                return
            new.writing = False
            live.append(new)
            sel.register(new.rfd, selectors.EVENT_READ, new)

        def flush(w: _Worker) -> None:
            """Write what the pipe takes now; wait for write-readiness of the *write* end for the rest."""
            if w.outbuf:
                try:
                    n = os.write(w.wfd, w.outbuf)
                    del w.outbuf[:n]
                except BlockingIOError:
                    pass
            if w.outbuf and not w.writing:
                sel.register(w.wfd, selectors.EVENT_WRITE, w)
                w.writing = True
            elif not w.outbuf and w.writing:
                sel.unregister(w.wfd)
                w.writing = False

        try:
            while remaining > 0:
                now = time.monotonic()
                for w in list(live):
                    while todo and len(w.inflight) < _DEPTH:
                        i = todo.popleft()
                        job = jobs[i]
                        body = json.dumps([i, job.program, job.test, job.entry_point, job.prompt, job.cpu_s]).encode()
                        w.outbuf += len(body).to_bytes(4, "big") + body
                        w.inflight.append(i)
                        if w.deadline is None:
                            w.deadline = now + budget
                    try:
                        flush(w)
                    except OSError:
                        lost(w, "closed its input")
                if remaining == 0 or not live:
                    break
                deadlines = [w.deadline for w in live if w.deadline is not None]
                timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
                for key, mask in sel.select(timeout):
                    w = key.data
                    if w not in live:
                        continue
                    if key.fd == w.wfd:
                        try:
                            flush(w)
                        except OSError:
                            lost(w, "closed its input")
                        continue
                    try:
                        chunk = os.read(w.rfd, 1 << 16)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        lost(w, "died")
                        continue
                    w.inbuf += chunk
                    try:
                        frames = w.frames()
                    except ValueError as e:
                        lost(w, f"sent a malformed frame ({e})")
                        continue
                    for frame in frames:
                        if frame[0] == "lost":  # its fork server is gone; the jobs it still holds never started
                            lost(w, f"lost its fork server ({frame[1]})", started=False)
                            break
                        idx, outcome, phase, etype, msg, cpu, output = frame
                        expected = w.inflight.popleft()
                        if idx != expected:
                            raise RuntimeError(f"sandbox worker answered job {idx}, expected {expected}")
                        finish(idx, ExecResult(Outcome[outcome], None if phase is None else Phase(phase),
                                               etype, msg, cpu, output))
                        w.deadline = time.monotonic() + budget if w.inflight else None
                now = time.monotonic()
                for w in [w for w in live if w.deadline is not None and w.deadline < now]:
                    lost(w, f"gave no answer within {budget:g}s")
            while todo:  # only if every worker was lost
                finish(todo.popleft(), _infra("worker-start", "no sandbox worker left"))
        finally:
            for w in list(live):
                if w.writing:
                    sel.unregister(w.wfd)
                    w.writing = False
                if w.inflight:  # interrupted (e.g. KeyboardInterrupt): results would arrive out of step
                    live.remove(w)
                    w.kill()
            sel.close()

    def close(self) -> None:
        """Stop the workers (waits for a `run` in progress on another thread to finish first)."""
        self._closed = True
        with self._lock:
            self._finalizer()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
