"""Fork-server worker of sandbox/executor.py (private; standard library only, imports nothing from the project).

`Sandbox` starts one per core as `python -s -P sandbox/_worker.py CONFIG_JSON` and talks to it through
length-prefixed marshal frames on its stdin/stdout. At start the worker imports the standard library modules
solutions use, enters fresh namespaces (mount, pid, network, ipc; a user namespace first when not root) and
becomes the "zygote": pid 1 of its pid namespace, one job at a time. Per job it forks a child that drops to a
uid of its own, sets rlimits, runs the program and then the tests, and writes its verdict into an anonymous
shared page (no file descriptor to find) tagged with a per-job random nonce. The zygote trusts a verdict only if
the nonce matches and the child exited through the harness path; anything else is classified from how the child
died. See docs/sandbox.md for what is and is not isolated.
"""

from __future__ import annotations

import builtins
import ctypes
import gc
import importlib
import io
import json
import marshal
import math
import mmap
import os
import resource
import select
import shutil
import signal
import struct
import sys
import types

# --- constants shared with sandbox/executor.py (kept in sync by tests/test_sandbox.py) -------------------------------

OUTCOMES = (
    "PASS", "SYNTAX_ERROR", "NAME_ERROR", "IMPORT_ERROR", "TYPE_ERROR", "ASSERTION_FAIL", "INDEX_ERROR",
    "KEY_ERROR", "VALUE_ERROR", "ATTRIBUTE_ERROR", "ZERO_DIVISION", "RECURSION", "OTHER_EXCEPTION", "TIMEOUT",
    "MEMORY", "CRASHED", "NO_CODE", "INFRA_ERROR",
)
_CODE = {name: i for i, name in enumerate(OUTCOMES)}

# Exception class -> outcome, first isinstance match wins (subclasses before their bases).
EXCEPTION_OUTCOMES = (
    (SyntaxError, "SYNTAX_ERROR"),  # also IndentationError, TabError
    (RecursionError, "RECURSION"),  # before RuntimeError-like catch-alls
    (MemoryError, "MEMORY"),
    (NameError, "NAME_ERROR"),  # also UnboundLocalError
    (ImportError, "IMPORT_ERROR"),  # also ModuleNotFoundError
    (TypeError, "TYPE_ERROR"),
    (AssertionError, "ASSERTION_FAIL"),
    (IndexError, "INDEX_ERROR"),
    (KeyError, "KEY_ERROR"),
    (ValueError, "VALUE_ERROR"),  # also UnicodeError
    (AttributeError, "ATTRIBUTE_ERROR"),
    (ZeroDivisionError, "ZERO_DIVISION"),
    (SystemExit, "CRASHED"),  # the program tried to end the process: it "died without a verdict"
    (KeyboardInterrupt, "CRASHED"),
)

FEATURES = ("setuid", "userns", "mountns", "pidns", "netns", "ipcns")

# --- shared-page layout ----------------------------------------------------------------------------------------
# header: progress, outcome, phase, pad, len(error_type), len(message), len(output), nonce[16], writer pid
_HDR = struct.Struct("<BBBxIII16sI")
_P_SETUP, _P_DEFINITION, _P_TEST, _P_FINISH = 0, 1, 2, 3
_PHASES = {_P_DEFINITION: "definition", _P_TEST: "test", _P_FINISH: "test"}
_OUTLEN_AT = 12  # offset of len(output) inside the header
_ETYPE_AT, _ETYPE_MAX = 64, 128
_MSG_AT, _MSG_MAX = 192, 512
_OUT_AT = 2048
_EXIT_SETUP_FAILED = 71  # child could not set itself up: a harness fault
_EXIT_HARNESS_FELL_THROUGH = 70

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
CLONE_NEWNET, CLONE_NEWIPC = 0x40000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 28, 36, 38
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                       "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


# --- framing ---------------------------------------------------------------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, int.from_bytes(head, "big"))
    return None if body is None else marshal.loads(body)


def _write_frame(fd: int, obj) -> None:
    body = marshal.dumps(obj)
    view = memoryview(len(body).to_bytes(4, "big") + body)
    while view:
        view = view[os.write(fd, view):]


# --- isolation (once per worker) -------------------------------------------------------------------------------

def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _enter_user_namespace() -> bool:
    """Unprivileged: map our uid/gid to 0 inside a new user namespace so the other namespaces can be created."""
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER):
        return False
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    except OSError:
        return False
    return True


def _mountinfo() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 etc.
            flags = 0
            for opt in fields[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _python_dirs() -> list[str]:
    """Directories a job's Python needs to read: the import path, the prefixes, the interpreter's own dir."""
    dirs = [p for p in sys.path if p] + [sys.prefix, sys.base_prefix, sys.exec_prefix,
                                         os.path.dirname(os.path.realpath(sys.executable))]
    return sorted({os.path.realpath(d) for d in dirs if os.path.exists(d)})


def _expose_python(notes: list[str]) -> None:
    """Python installed under a directory other users can't enter (pyenv in /root is common): inside our mount
    namespace, replace each such directory with a tmpfs that holds only the way to the Python files (bind
    mounts, read-only). The rest of that directory stays hidden from jobs."""
    reach: dict[str, set[str]] = {}  # blocked directory -> names inside it that lead to Python
    for target in _python_dirs():
        parts = target.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/" + "/".join(parts[:depth])
            if not os.stat(parent).st_mode & 0o001:
                reach.setdefault(parent, set()).add(parts[depth])
    if not reach:
        return
    fds = {}  # opened before anything is mounted over their parents
    for parent, names in reach.items():
        for name in names:
            fds[(parent, name)] = os.open(os.path.join(parent, name), os.O_PATH)
    try:
        for parent in sorted(reach, key=lambda p: p.count("/")):  # outermost first
            _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0711")
            for name in sorted(reach[parent]):
                fd, target = fds[(parent, name)], os.path.join(parent, name)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            _mount(None, parent, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=64k,mode=0711")
            notes.append(f"{parent} is hidden from jobs except the way to Python ({', '.join(sorted(reach[parent]))})")
    finally:
        for fd in fds.values():
            os.close(fd)


def _private_filesystem(job_root: str, size_mb: int, remount_proc: bool, expose_python: bool) -> list[str]:
    """Inside our mount namespace: a fresh tmpfs for jobs under job_root, every other mount read-only, /dev/shm and
    /run hidden, /proc showing only our pid namespace. Raises (having changed nothing visible) if the tmpfs fails."""
    notes = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here propagates to the host
    mounts = _mountinfo()
    # job_root: a tiny tmpfs, read-only once it holds the mount point of the job's own tmpfs, job_root/job. So a job
    # can write only there (even where it shares our uid, in a user namespace), and we can empty it between jobs.
    job_dir = os.path.join(job_root, "job")
    _mount("tmpfs", job_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=16,mode=0755")
    os.mkdir(job_dir, 0o700)
    _mount("tmpfs", job_dir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,nr_inodes=8192,mode=0700")
    _mount(None, job_root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=16,mode=0755")
    for point, keep in mounts:
        if point == job_root:
            continue  # the top mount there is now our tmpfs
        try:
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep)
        except OSError as e:
            notes.append(f"could not make {point} read-only ({e.strerror})")
    if remount_proc:
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            notes.append(f"could not mount a private /proc ({e.strerror})")
    for hidden in ("/dev/shm", "/run"):  # world-writable scratch, and host daemons' unix sockets
        if hidden != job_root and os.path.isdir(hidden):
            try:
                _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0755")
            except OSError as e:
                notes.append(f"could not hide {hidden} ({e.strerror})")
    if expose_python:
        try:
            _expose_python(notes)
        except OSError as e:
            notes.append(f"could not expose the Python installation to jobs ({e})")
    return notes


def _drop_capabilities() -> None:
    """User-namespace mode: we are uid 0 of our namespace, with every capability in it. Give them all up for
    good (bounding set, securebits, capset), so a job can't remount our read-only view or leave the tmpfs."""
    _prctl(PR_SET_SECUREBITS, 0x2F)  # NOROOT(+lock), NO_SETUID_FIXUP(+lock), KEEP_CAPS lock
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    _check(_libc.capset(header, data), "capset")


def _user_process_count(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return count


def _can_switch_uid(uid: int) -> str | None:
    """None if a child can switch to `uid` and still read the Python installation, else why not."""
    needed = _python_dirs()  # as root: a path we can't see after the switch must still count
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except BaseException:
            os._exit(1)
        for d in needed:
            try:
                os.listdir(d)
            except OSError:
                os._exit(2)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: None, 1: "setresuid failed", 2: "the Python installation would not be readable"}.get(
        code, f"probe exited with {code}")


def _isolate(cfg: dict, proto: tuple[int, int]) -> tuple[set[str], list[str], str]:
    """Enter namespaces; returns (features in effect, notes, job root). Returns in the zygote process."""
    want = set(cfg["features"])
    have: set[str] = set()
    notes: list[str] = []
    root = os.geteuid() == 0
    if not root and "userns" in want and ({"mountns", "pidns", "netns", "ipcns"} & want):
        if _enter_user_namespace():
            have.add("userns")
        else:
            notes.append("user namespaces unavailable")
    for name, flag in (("mountns", CLONE_NEWNS), ("netns", CLONE_NEWNET), ("ipcns", CLONE_NEWIPC),
                       ("pidns", CLONE_NEWPID)):
        if name in want:
            if _unshare(flag):
                have.add(name)
            else:
                notes.append(f"unshare {name} failed: {os.strerror(ctypes.get_errno())}")
    if "pidns" in have:
        zygote = os.fork()
        if zygote:  # we stay outside as a plain waiter; the zygote is pid 1 inside
            for fd in proto:
                os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                _, status = os.waitpid(zygote, 0)
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # our waiter killed -> we die, and the whole pid namespace with us
    else:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a job come back to us, so we can kill them
    prefix_in_tmp = any(p == "/tmp" or p.startswith("/tmp/")
                        for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)))
    job_root = "/dev/shm" if prefix_in_tmp else "/tmp"
    if "mountns" in have:
        try:
            notes += _private_filesystem(job_root, cfg["tmpfs_mb"], remount_proc="pidns" in have,
                                         expose_python=root and "setuid" in want)
        except OSError as e:
            have.discard("mountns")
            notes.append(f"private filesystem failed: {e}")
    if "mountns" not in have:  # (not tempfile.mkdtemp: tempfile imports random, whose at-fork hook costs every job)
        job_root = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pairloop-sandbox-{os.urandom(6).hex()}")
        os.mkdir(job_root, 0o711)  # enterable, not listable, by the job uid
        os.mkdir(os.path.join(job_root, "job"), 0o700)
    if "setuid" in want:
        why = _can_switch_uid(cfg["uid"]) if root else "not root"
        if why is None:
            have.add("setuid")
        else:
            notes.append(f"jobs keep our uid: cannot switch to an unprivileged one ({why})")
    if "userns" in have:
        try:
            _drop_capabilities()
        except OSError as e:  # keeping namespace capabilities would let a job undo its read-only view
            raise RuntimeError(f"cannot drop capabilities inside the user namespace: {e}") from e
    return have, notes, job_root


# --- the child: runs the program and the tests, writes the verdict ---------------------------------------------

class ForgedEquality(Exception):
    """The entry point returned an object that claims to equal an unrelated object (an always-equal hack)."""


_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None), bytearray, range, slice})
_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})  # compare element by element: look inside instead
_SENTINEL = object()


def _forged(result) -> bool:
    """Does `result`, or anything inside its lists/tuples/sets/dicts, claim to equal a fresh object()?"""
    stack, seen, budget = [result], set(), 1_000_000
    while stack and budget > 0:
        x = stack.pop()
        budget -= 1
        t = type(x)
        if t in _PLAIN:
            continue
        if t not in _CONTAINERS:
            try:
                eq, ne = x == _SENTINEL, x != _SENTINEL
                if eq is True or ne is False:
                    return True
            except Exception:
                pass
        if isinstance(x, (list, tuple, set, frozenset, dict)) and id(x) not in seen:
            seen.add(id(x))
            try:
                stack.extend(x.items() if isinstance(x, dict) else x)
            except Exception:
                pass
    return False


class _Sink(io.TextIOBase):
    """sys.stdout/sys.stderr of a job: keeps the first bytes in the shared page, no system calls."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, page: mmap.mmap, cap: int) -> None:
        self._page, self._cap, self._n = page, cap, 0
        self.buffer = _BinarySink(self)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1  # /dev/null

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.keep(s[:self._cap - self._n].encode("utf-8", "replace"))
        return len(s)

    def keep(self, b: bytes) -> None:
        room = self._cap - self._n
        if room > 0 and b:
            b = b[:room]
            self._page[_OUT_AT + self._n:_OUT_AT + self._n + len(b)] = b
            self._n += len(b)
            struct.pack_into("<I", self._page, _OUTLEN_AT, self._n)


class _BinarySink(io.RawIOBase):
    def __init__(self, text: _Sink) -> None:
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self._text.keep(b)
        return len(b)


def _names(code: types.CodeType) -> set[str]:
    """Every name a code object (and the code nested in it) refers to; a superset of what it imports."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _unlock(func, path, _exc_info) -> None:
    """rmtree error handler: a job may leave directories it made unreadable; as their owner (or root) reopen them.
    rmtree does not descend after an error, so the caller repeats it."""
    for target in (os.path.dirname(path), path):
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
        except OSError:
            pass


class Zygote:
    def __init__(self, cfg: dict, features: set[str], job_root: str, user_procs: int | None) -> None:
        lim = cfg["limits"]
        self.cpu_s = float(lim["cpu_s"])
        self.wall_s = float(lim["wall_s"])
        self.mem_bytes = int(lim["memory_mb"]) << 20
        self.fsize_bytes = int(lim["file_size_mb"]) << 20
        self.max_procs = int(lim["max_procs"])
        self.out_cap = int(lim["max_output_bytes"])
        self.features = features
        self.uid = cfg["uid"] if "setuid" in features else None
        # RLIMIT_NPROC counts every process of the job's real uid. With a uid of its own that is the job alone;
        # otherwise it is all of this user's processes, so allow what runs now plus a margin (a fork bomb still
        # stops; the margin absorbs the user starting more processes later).
        self.nproc = self.max_procs if self.uid is not None else (
            None if user_procs is None else user_procs + self.max_procs + 256)
        self.job_dir = os.path.join(job_root, "job")
        self.job_root = job_root
        self.tests: dict[str, tuple] = {}
        self.page = mmap.mmap(-1, _OUT_AT + max(self.out_cap, 1))
        self.devnull = os.open(os.devnull, os.O_RDWR)
        # Freed when reporting a MemoryError, so the report itself fits. bytes() is calloc'd: untouched zero pages,
        # so it costs address space but no page-table entries to copy at each fork.
        self.ballast = bytes(1 << 20)
        self.pristine_builtins = dict(builtins.__dict__)
        self.maxfd = max(os.sysconf("SC_OPEN_MAX"), 1024)
        self.job_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.job_dir, "TMPDIR": self.job_dir,
                        "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
                        "OMP_NUM_THREADS": "1"}
        os.environ.clear()
        os.environ.update(self.job_env)
        if self.uid is not None:
            os.chown(self.job_dir, self.uid, self.uid)
        self.sink = _Sink(self.page, self.out_cap)  # each child writes to its own copy; made once, here
        # Inherited by every child, so set once here rather than per job (a child's first ctypes call alone costs
        # ~60 copy-on-write page faults). None of them hinders the fork server itself.
        resource.setrlimit(resource.RLIMIT_AS, (self.mem_bytes, self.mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_bytes, self.fsize_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.nproc is not None:  # root is exempt; a child's uid switch makes it count
            resource.setrlimit(resource.RLIMIT_NPROC, (self.nproc, self.nproc))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability can raise a job's privileges

    # -- per job, in the zygote --
    def _empty_job_dir(self) -> None:
        """Leave the job dir empty and 0700 for the next job (the job owns it, so it may have chmod'ed it)."""
        os.chmod(self.job_dir, 0o700)
        for name in os.listdir(self.job_dir):  # usually none
            path = os.path.join(self.job_dir, name)
            if not os.path.isdir(path) or os.path.islink(path):
                os.unlink(path)
                continue
            for _ in range(10_000):  # one more level of locked directories per pass (root needs one pass)
                shutil.rmtree(path, onerror=_unlock)
                if not os.path.lexists(path):
                    break
            else:
                raise OSError(f"cannot empty the job dir: {path} remains")

    def _test(self, test: str):
        entry = self.tests.get(test)
        if entry is None:
            try:
                code = compile(test, "<test>", "exec", dont_inherit=True)
            except BaseException as e:  # a broken problem set is not the model's failure
                return None, f"test code does not compile: {type(e).__name__}: {e}"[:_MSG_MAX]
            check_code = next((c for c in code.co_consts
                               if isinstance(c, types.CodeType) and c.co_name == "check"), None)
            imports = [(name, sys.modules[name]) for name in sorted(_names(code)) if name in sys.modules]
            if len(self.tests) >= 512:
                self.tests.clear()
            entry = self.tests[test] = (code, check_code, imports)
        return entry, None

    def run(self, idx: int, program: str, test: str, entry_point: str) -> tuple:
        compiled, err = self._test(test)
        if compiled is None:
            return (idx, "INFRA_ERROR", None, "SyntaxError", err, 0.0, "")
        page = self.page
        page[:_HDR.size] = bytes(_HDR.size)
        nonce = os.urandom(16)
        pid = os.fork()
        if pid == 0:
            try:
                self._child(nonce, program, compiled, entry_point)
            finally:
                os._exit(_EXIT_HARNESS_FELL_THROUGH)
        wall_killed = self._wait_or_kill(pid)
        _, status, ru = os.wait4(pid, 0)
        self._kill_leftovers()
        result = self._verdict(idx, pid, nonce, status, ru, wall_killed)
        self._empty_job_dir()
        return result

    def recover(self) -> None:
        """After a failure of our own mid-job: no process of the job left, an empty job dir."""
        if "pidns" in self.features:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_leftovers()
        self._empty_job_dir()

    def _wait_or_kill(self, pid: int) -> bool:
        """Block until the child exits or the wall-clock backstop passes (then SIGKILL it). True if killed."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                if poller.poll(int(self.wall_s * 1000)):
                    return False
            finally:
                os.close(pidfd)
        else:  # old kernels: poll waitpid
            deadline = os.times().elapsed + self.wall_s
            delay = 0.0005
            while os.times().elapsed < deadline:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return False
                select.select([], [], [], delay)
                delay = min(delay * 2, 0.05)
        os.kill(pid, signal.SIGKILL)
        return True

    def _kill_leftovers(self) -> None:
        """Kill every process the job started (they are all ours: pid 1 of the namespace, or subreaper)."""
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                pass
        except ChildProcessError:
            return  # no descendants left at all
        if "pidns" in self.features:
            try:
                os.kill(-1, signal.SIGKILL)  # as pid 1: everything else in our namespace
            except ProcessLookupError:
                pass
        for _ in range(10_000):
            if "pidns" not in self.features:
                for child in self._children():
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    @staticmethod
    def _children() -> list[int]:
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            out = []
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        with open(f"/proc/{name}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                                out.append(int(name))
                    except (OSError, IndexError, ValueError):
                        pass
            return out

    def _verdict(self, idx, pid, nonce, status, ru, wall_killed) -> tuple:
        page = self.page
        progress, code, phase, etype_len, msg_len, out_len, got_nonce, writer = _HDR.unpack_from(page, 0)
        cpu = ru.ru_utime + ru.ru_stime
        out_len = min(out_len, self.out_cap)
        output = page[_OUT_AT:_OUT_AT + out_len].decode("utf-8", "replace")
        where = _PHASES.get(progress)
        clean_exit = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # Trusted only if: our nonce, written by the job's own process (not a forked copy), which then left
        # through the harness's os._exit(0), before the backstop.
        if got_nonce == nonce and writer == pid and clean_exit and code < len(OUTCOMES) and not wall_killed:
            etype = page[_ETYPE_AT:_ETYPE_AT + min(etype_len, _ETYPE_MAX)].decode("utf-8", "replace") or None
            msg = page[_MSG_AT:_MSG_AT + min(msg_len, _MSG_MAX)].decode("utf-8", "replace") or None
            outcome = OUTCOMES[code]
            return (idx, outcome, None if outcome == "PASS" else _PHASES.get(phase), etype, msg, cpu, output)
        if progress == _P_SETUP:
            msg = page[_MSG_AT:_MSG_AT + min(msg_len, _MSG_MAX)].decode("utf-8", "replace")
            return (idx, "INFRA_ERROR", None, None, f"job setup failed: {msg or os.waitstatus_to_exitcode(status)}",
                    cpu, output)
        if wall_killed:
            return (idx, "TIMEOUT", where, None, f"wall-clock limit {self.wall_s:g}s exceeded ({cpu:.2f}s CPU)",
                    cpu, output)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
            if sig in (signal.SIGPROF, signal.SIGXCPU) or (sig == signal.SIGKILL and cpu >= self.cpu_s):
                return (idx, "TIMEOUT", where, None, f"CPU limit {self.cpu_s:g}s exceeded", cpu, output)
            if ru.ru_maxrss * 1024 >= 0.8 * self.mem_bytes:
                return (idx, "MEMORY", where, name, f"killed by {name} at {ru.ru_maxrss >> 10} MiB resident "
                        f"(limit {self.mem_bytes >> 20} MiB)", cpu, output)
            return (idx, "CRASHED", where, name, f"killed by {name}", cpu, output)
        code = os.waitstatus_to_exitcode(status)
        return (idx, "CRASHED", where, None, f"exited with status {code} without a verdict", cpu, output)

    # -- in the forked child --
    def _child(self, nonce: bytes, program: str, compiled: tuple, entry_point: str) -> None:
        page = self.page
        try:
            os.setsid()
            for fd in (0, 1, 2):
                os.dup2(self.devnull, fd)
            os.closerange(3, self.maxfd)  # the protocol pipes, anything else inherited
            os.chdir(self.job_dir)
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                os.write(fd, b"1000")  # if memory runs out, the kernel kills the job first
                os.close(fd)
            except OSError:
                pass
            # AS, FSIZE, CORE, NPROC, SIGXFSZ and no_new_privs come from the fork server (see __init__).
            cpu_soft = math.ceil(self.cpu_s) + 1  # backstop if the job ignores SIGPROF (CPU counts from fork)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 1))
            if self.uid is not None:
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            if "pidns" not in self.features:  # else the namespace dies with the fork server anyway
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.setitimer(signal.ITIMER_PROF, self.cpu_s)  # precise CPU limit; default action kills
        except BaseException as e:
            b = f"{type(e).__name__}: {e}".encode()[:_MSG_MAX]
            page[_MSG_AT:_MSG_AT + len(b)] = b
            struct.pack_into("<I", page, 8, len(b))
            os._exit(_EXIT_SETUP_FAILED)

        page[0] = _P_DEFINITION
        sink = self.sink
        sys.stdout = sys.stderr = sink
        module = types.ModuleType("__candidate__")  # not "__main__": main-guarded demo code does not run
        sys.modules["__candidate__"] = module
        ns = module.__dict__
        ns["__builtins__"] = builtins
        try:
            code = compile(program, "<program>", "exec", dont_inherit=True)
        except (MemoryError, RecursionError) as e:
            self._finish(nonce, e, _P_DEFINITION)
        except BaseException as e:  # SyntaxError, IndentationError, TabError, ValueError (null bytes)
            self._finish(nonce, e, _P_DEFINITION, "SYNTAX_ERROR")
        try:
            exec(code, ns)
        except BaseException as e:
            self._finish(nonce, e, _P_DEFINITION)

        page[0] = _P_TEST
        sys.settrace(None)
        sys.setprofile(None)
        sys.stdout = sys.stderr = sink
        test_code, check_code, test_imports = compiled
        for name, mod in test_imports:  # undo a program's swapping out of modules the tests import
            if sys.modules.get(name) is not mod:
                sys.modules[name] = mod
        candidate = ns.get(entry_point, _SENTINEL)
        if candidate is _SENTINEL:
            self._finish(nonce, NameError(f"the program does not define {entry_point!r}"), _P_TEST)
        forged = []

        def guarded(*args, **kwargs):
            result = candidate(*args, **kwargs)
            if type(result) not in _PLAIN and _forged(result):
                forged.append(type(result).__name__)
                raise ForgedEquality(f"{entry_point} returned a {type(result).__name__} that claims to equal "
                                     "an unrelated object")
            return result

        tns = dict(ns)  # the tests see the program's globals (HumanEval tests call helpers from the prompt) ...
        tns.pop("check", None)  # ... but never a `check` the program defined
        tns["__builtins__"] = self.pristine_builtins  # ... and builtins as they were before the program ran
        tns[entry_point] = guarded
        try:
            exec(test_code, tns)
            check = tns.get("check")
            if check_code is not None and getattr(check, "__code__", None) is not check_code:
                self._finish(nonce, None, _P_TEST, "INFRA_ERROR", "check() is not the one the test code defines")
            if not callable(check):
                self._finish(nonce, None, _P_TEST, "INFRA_ERROR", "the test code does not define check()")
            check(guarded)
        except BaseException as e:
            if forged:
                e = ForgedEquality(f"{entry_point} returned a {forged[0]} that claims to equal an unrelated object")
            self._finish(nonce, e, _P_TEST)
        if forged:
            self._finish(nonce, ForgedEquality(f"{entry_point} returned a {forged[0]} that claims to equal an "
                                               "unrelated object"), _P_TEST)
        self._finish(nonce, None, _P_TEST, "PASS")

    def _finish(self, nonce: bytes, exc: BaseException | None, phase: int, outcome: str | None = None,
                message: str | None = None) -> None:
        """Write the verdict (payload first, nonce last) and leave through the harness path."""
        if isinstance(exc, MemoryError):
            self.ballast = None
        page = self.page
        page[0] = _P_FINISH
        etype = b""
        if exc is not None:
            exc.__traceback__ = None  # drop frames (and whatever a memory bomb holds) before formatting
            if outcome is None:
                outcome = next((o for cls, o in EXCEPTION_OUTCOMES if isinstance(exc, cls)), "OTHER_EXCEPTION")
            try:
                etype = type(exc).__name__.encode("utf-8", "replace")[:_ETYPE_MAX]
            except BaseException:
                etype = b"?"
            try:
                message = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
            except BaseException:
                message = "<unprintable exception>"
            del exc
        if outcome == "INFRA_ERROR":
            phase = 0
        msg = (message or "").encode("utf-8", "replace")[:_MSG_MAX]
        page[_ETYPE_AT:_ETYPE_AT + len(etype)] = etype
        page[_MSG_AT:_MSG_AT + len(msg)] = msg
        out_len = struct.unpack_from("<I", page, _OUTLEN_AT)[0]
        _HDR.pack_into(page, 0, _P_FINISH, _CODE[outcome], phase, len(etype), len(msg), out_len, bytes(16),
                       os.getpid())
        page[16:32] = nonce  # commit
        os._exit(0)


# --- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # a stray print must never corrupt the protocol
    os.close(null)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    missing = []
    for name in cfg["preload"]:
        try:
            importlib.import_module(name)
        except Exception:
            missing.append(name)
    # counted before entering namespaces: the kernel counts the real uid's processes host-wide (root: no limit)
    user_procs = None if os.geteuid() == 0 else _user_process_count(os.getuid())
    features, notes, job_root = _isolate(cfg, (proto_in, proto_out))
    if missing:
        notes.append(f"could not preload {', '.join(missing)}")
    zygote = Zygote(cfg, features, job_root, user_procs)
    _write_frame(proto_out, ("ready", sorted(features), notes, job_root))
    gc.collect()
    gc.freeze()  # children's collections skip everything imported so far: fewer copy-on-write faults
    try:
        while True:
            frame = _read_frame(proto_in)
            if frame is None:
                break
            try:
                result = zygote.run(*frame)
            except Exception as e:  # ours, not the job's (e.g. fork failed): report it, clean up, carry on
                result = (frame[0], "INFRA_ERROR", None, type(e).__name__, f"fork server: {e}"[:_MSG_MAX], 0.0, "")
                zygote.recover()  # if this raises too, we exit and the parent starts a fresh worker
            _write_frame(proto_out, result)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        if "mountns" not in features:
            shutil.rmtree(job_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
