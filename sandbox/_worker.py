"""Worker of sandbox/executor.py: a judge and a fork server (private; standard library only, no project imports).

`Sandbox` starts one per core as `python -s -P sandbox/_worker.py CONFIG_JSON` and talks to it through
length-prefixed JSON frames on its stdin/stdout. At start the worker imports the standard library modules
solutions use, enters fresh namespaces (mount, network, ipc, pid; a user namespace first when not root) and forks:

- the *fork server* (pid 1 of the new pid namespace, never runs model code, non-dumpable, holds no descriptor but
  its socket to the judge) forks one *job process* per job, which drops to a uid of its own, sets rlimits and a
  seccomp filter, runs the model's program and then answers calls of the entry point, one at a time, with the
  return value (or the exception) in a tagged plain-data encoding (JSON underneath; never pickle or marshal);
- the *judge* (this process, outside the job's pid namespace, never runs model code, non-dumpable) runs the
  problem's test code, with the problem's own prompt helpers, in a clean namespace where `candidate` (and the
  entry point's name) is a proxy that sends each call to the job process, and decides the verdict itself.

So the job process holds nothing that could declare PASS: the only thing it can send is answers, and PASS means
the test's own `check`, in the judge, returned. See docs/sandbox.md for what is and is not isolated.
"""

from __future__ import annotations

import builtins
import ctypes
import fcntl
import gc
import importlib
import io
import json
import math
import mmap
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import types

# --- constants shared with sandbox/executor.py (kept in sync by tests/test_sandbox.py) -------------------------------

OUTCOMES = (
    "PASS", "SYNTAX_ERROR", "TRUNCATED", "NAME_ERROR", "IMPORT_ERROR", "TYPE_ERROR", "ASSERTION_FAIL", "INDEX_ERROR",
    "KEY_ERROR", "VALUE_ERROR", "ATTRIBUTE_ERROR", "ZERO_DIVISION", "RECURSION", "OTHER_EXCEPTION", "TIMEOUT",
    "MEMORY", "CRASHED", "NO_CODE", "INFRA_ERROR",
)
# What a job process may claim for itself (never PASS, never one of ours, never TRUNCATED: the engine's to say).
_JOB_OUTCOMES = frozenset(OUTCOMES) - {"PASS", "NO_CODE", "INFRA_ERROR", "TRUNCATED"}

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

FEATURES = ("setuid", "userns", "mountns", "pidns", "netns", "ipcns", "seccomp")

# INFRA_ERROR causes (ExecResult.error_type of an INFRA_ERROR); the executor adds its own (worker-lost, ...).
CAUSE_TEST_CODE = "test-code"  # the test code does not compile or defines no check()
CAUSE_TEST_INPUT = "test-input"  # the test passes the candidate something the judge cannot send
CAUSE_TEST_NAME = "test-name"  # the test needs a name the judge lacks (a helper the prompt, if given, lacks)
CAUSE_JOB_SETUP = "job-setup"  # the job process could not set itself up (before any model code ran)
CAUSE_FORK = "fork-server"  # the fork server failed (e.g. fork() failed)

# --- shared page: the job's printed output and, if its set-up fails, why ------------------------------------------
_OUTLEN_AT = 0  # u32 length of the output kept
_MSG_AT, _MSG_MAX = 64, 512  # set-up failure message
_OUT_AT = 1024
_EXIT_SETUP_FAILED = 71  # the job process could not set itself up: a harness fault
_EXIT_HARNESS_FELL_THROUGH = 70

_MAX_FRAME = 16 << 20  # largest reply a job may send (bigger results are sent as an opaque value)
# Bytes asked of each read: a larger request makes os.read/recvmsg allocate (mmap) and free a buffer that size per
# call, ~16 us each on a small frame (measured: 1 MiB 17.6 us vs 64 KiB 1.1 us per write+read of 40 bytes); the
# protocol reads one per call of the entry point, on both sides. Bigger frames just take more reads.
_READ_CHUNK = 1 << 16
_BIG_INT = 1 << 64  # ints beyond this travel as hex (JSON's decimal ints are capped at 4300 digits on decode)
# Call plans (Judge): the encoded calls of a problem's test, as a passing job got them, written to the next job of
# that problem before it starts, so it answers them without a round trip each. At most this many bytes (and never
# more than the call pipe holds, so the write never blocks); the rest of a longer test goes call by call.
_PLAN_MAX_BYTES = 32 << 10
F_GETPIPE_SZ = 1032

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWCGROUP = 0x40000000, 0x08000000, 0x04000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 36, 38, 22
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


# --- framing: 4-byte big-endian length + JSON ------------------------------------------------------------------

def _no_default(o):
    raise TypeError(f"{type(o).__name__} is not plain data")


# Made once, in the worker, before any fork: a job process reuses them rather than building (and page-faulting
# in) a fresh encoder or decoder per frame. No circular-reference markers: a cycle ends in RecursionError.
_ENCODE = json.encoder.c_make_encoder(None, _no_default, json.encoder.encode_basestring_ascii, None, ":", ",",
                                      False, False, True) if json.encoder.c_make_encoder else None


def _pack(obj) -> bytes:
    if _ENCODE is not None:
        body = "".join(_ENCODE(obj, 0)).encode()
    else:
        body = json.dumps(obj, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


class _Reader:
    """Length-prefixed JSON frames from a blocking fd or socket, with a size cap."""

    def __init__(self, fd: int, limit: int = 1 << 40, tagged: bool = False) -> None:
        self.fd, self.limit, self.buf = fd, limit, bytearray()
        self.decode = _TAGGED.decode if tagged else _PLAIN.decode  # calls and replies carry tagged values

    def fill(self, timeout: float | None = None) -> bool:
        """Read what is there (waiting up to `timeout`, None: forever); False on EOF or timeout."""
        if timeout is not None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return False
        chunk = os.read(self.fd, _READ_CHUNK)
        self.buf += chunk
        return bool(chunk)

    def frame(self):
        """The next complete frame, or raise _NoFrame (need more bytes); ValueError if malformed."""
        if len(self.buf) < 4:
            raise _NoFrame
        n = int.from_bytes(self.buf[:4], "big")
        if n > self.limit:
            raise ValueError(f"frame of {n} bytes exceeds {self.limit}")
        if len(self.buf) < 4 + n:
            raise _NoFrame
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return self.decode(body.decode())

    def read(self, deadline: float | None = None):
        """Block for the next frame; None on EOF or when `deadline` (monotonic) passes."""
        while True:
            try:
                return self.frame()
            except _NoFrame:
                pass
            timeout = None if deadline is None else deadline - _now()
            if timeout is not None and timeout <= 0:
                return None
            if not self.fill(timeout):
                return None


class _NoFrame(Exception):
    pass


def _now() -> float:
    return os.times().elapsed  # monotonic enough for deadlines, no `time` import needed here


def _write_plan(fd: int, data: bytes) -> tuple[bool, str | None]:
    """Write a job's planned calls in one go: (written, our fault or None). The pipe is empty and holds them
    (the caller made them fit), so taking less is ours, never the model's. A broken pipe is not: every read end
    is closed because the job has already ended (a program that failed at definition time, before this write:
    seen under load as INFRA_ERROR for a SYNTAX_ERROR); its own outcome stands."""
    try:
        capacity = fcntl.fcntl(fd, F_GETPIPE_SZ)
        written = os.write(fd, data) if len(data) <= capacity else 0
    except BrokenPipeError:
        return False, None
    except OSError:
        written = 0
    if written != len(data):
        return False, f"call pipe took {written} of {len(data)} planned bytes"
    return True, None


def _write_all(fd: int, data: bytes, deadline: float | None = None) -> bool:
    """Write everything; False if the reader went away or the deadline passed (fd must be non-blocking then)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            timeout = None if deadline is None else deadline - _now()
            if timeout is not None and timeout <= 0:
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
        except (BrokenPipeError, ConnectionResetError):
            return False
    return True


# --- the plain-data encoding of arguments and results ---------------------------------------------------------
# JSON scalars and lists as themselves (bool, int, float incl. nan/inf, str, None, list); everything else is a
# one-key object: {"t": [...]} tuple, {"d": [k, v, ...]} dict, {"s": [...]} set, {"f": [...]} frozenset,
# {"b": hex} bytes, {"y": hex} bytearray, {"c": [re, im]} complex, {"i": hex} big int, {"o": type name} a value of
# any other type (opaque: equal only to itself). Decoding builds only these builtin types, whatever the bytes say.

class Opaque:
    """A value the job returned that has no plain-data form (a generator, a custom object, ...)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object returned by the candidate>"


def _encode(x):
    t = type(x)
    if t is str or t is bool or t is float or x is None:
        return x
    if t is int:
        return x if -_BIG_INT < x < _BIG_INT else {"i": format(x, "x")}
    if t is list:
        return [_encode(v) for v in x]
    if t is tuple:
        return {"t": [_encode(v) for v in x]}
    if t is dict:
        return {"d": [_encode(e) for kv in x.items() for e in kv]}
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, int):  # IntEnum, ...: its int value
        return _encode(int.__index__(x))
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, (set, frozenset)):
        return {"f" if isinstance(x, frozenset) else "s": [_encode(v) for v in x]}
    if isinstance(x, bytes):
        return {"b": bytes(x).hex()}
    if isinstance(x, bytearray):
        return {"y": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, tuple):  # namedtuples compare as tuples
        return {"t": [_encode(v) for v in x]}
    if isinstance(x, dict):  # Counter, OrderedDict, defaultdict compare as dicts
        return {"d": [_encode(e) for kv in dict.items(x) for e in kv]}
    return {"o": t.__name__}


def _decode_tagged(d: dict):
    if len(d) != 1:
        raise ValueError("tagged value must have exactly one key")
    (tag, v), = d.items()
    if tag == "t" and type(v) is list:
        return tuple(v)
    if tag == "d" and type(v) is list and len(v) % 2 == 0:
        return dict(zip(v[0::2], v[1::2]))
    if tag == "s" and type(v) is list:
        return set(v)
    if tag == "f" and type(v) is list:
        return frozenset(v)
    if tag in ("b", "y") and type(v) is str:
        return bytes.fromhex(v) if tag == "b" else bytearray.fromhex(v)
    if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
        return complex(v[0], v[1])
    if tag == "i" and type(v) is str:
        return int(v, 16)
    if tag == "o" and type(v) is str:
        return Opaque(v[:100])
    raise ValueError(f"bad tagged value {tag!r}")


_TAGGED = json.JSONDecoder(object_hook=_decode_tagged)
_PLAIN = json.JSONDecoder()
_OK, _DEFINED = _pack(["ok"]), _pack(["defined"])
_STOP_BODY = {"stop": 1}
_STOP = _pack(_STOP_BODY)  # judge -> fork server during a job: kill it, the verdict is in


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


def _private_filesystem(job_root: str, size_mb: int, remount_proc: bool,
                        expose_python: bool) -> tuple[list[str], bool]:
    """Inside our mount namespace: a fresh tmpfs for jobs under job_root, every other mount read-only, /dev/shm and
    /run hidden, /proc showing only our pid namespace. Raises (having changed nothing visible) if the tmpfs fails.
    Returns (notes, whether /proc now shows only our pid namespace)."""
    notes = []
    private_proc = False
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
            private_proc = True
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
    return notes, private_proc


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


def _unlock(func, path, _exc_info) -> None:
    """rmtree error handler: a job may leave directories it made unreadable; as their owner (or root) reopen them.
    rmtree does not descend after an error, so the caller repeats it."""
    for target in (os.path.dirname(path), path):
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
        except OSError:
            pass


def _user_task_count(uid: int) -> int:
    """Tasks (processes and their threads) of `uid`: what the kernel counts against RLIMIT_NPROC."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


# --- seccomp: a deny list as a classic BPF program, loaded with prctl (x86-64 only) -------------------------------
# What a job never needs: debugging or reading other processes, namespaces and mounts, kernel keyrings, BPF,
# modules, io_uring (its operations bypass seccomp), perf, userfaultfd, reboot/swap/acct, file-handle tricks.
# Denied calls fail with EPERM (clone3 with ENOSYS, so glibc falls back to clone, whose namespace flags are denied).
_SECCOMP_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "perf_event_open": 298,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "reboot": 169,
    "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "iopl": 172, "ioperm": 173,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "lookup_dcookie": 212, "personality": 135,
}
_NR_CLONE_X86_64, _NR_CLONE3_X86_64 = 56, 435
_AUDIT_ARCH_X86_64 = 0xC000003E
_NS_FLAGS = CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
SECCOMP_DENIED = tuple(sorted(_SECCOMP_X86_64)) + ("clone3", "clone with namespace flags")


def _seccomp_program() -> bytes | None:
    """The filter for this machine, or None where it has no table (not x86-64)."""
    if os.uname().machine != "x86_64":
        return None
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    ins = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH_X86_64), (ret, 0, 0, kill),  # arch check
           (ld, 0, 0, 0), (0x35, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # nr; x32 ABI (JGE) denied
    for nr in sorted(_SECCOMP_X86_64.values()):
        ins += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    ins += [(jeq, 0, 1, _NR_CLONE3_X86_64), (ret, 0, 0, enosys),
            (jeq, 0, 3, _NR_CLONE_X86_64), (ld, 0, 0, 16), (jset, 0, 1, _NS_FLAGS), (ret, 0, 0, eperm),
            (ret, 0, 0, allow)]
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


def _load_seccomp(prog: bytes) -> None:
    """Needs no_new_privs (set in the fork server). Inherited by every process and thread the job starts."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("<HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    arg = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.c_void_p(ctypes.addressof(arg)), 0, 0),
           "prctl(PR_SET_SECCOMP)")


def _isolate(cfg: dict, proto: tuple[int, int]):
    """Enter namespaces and fork. Returns ("judge", zygote pid, socket) in this process and ("zygote", socket,
    features in effect, notes, job root) in the child, the fork server (pid 1 of the new pid namespace)."""
    want = set(cfg["features"])
    have: set[str] = set()
    notes: list[str] = []
    root = os.geteuid() == 0
    # force_userns (tests): take the user-namespace path even as root (uid 0 mapped to itself, then every
    # capability dropped), which is what a non-root node gets.
    if (not root or cfg.get("force_userns")) and "userns" in want and ({"mountns", "pidns", "netns", "ipcns"} & want):
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
    judge_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    zygote = os.fork()
    if zygote:  # the judge: outside the job's pid namespace (its pid is not even visible to jobs)
        zygote_end.close()
        return "judge", zygote, judge_end
    judge_end.close()
    for fd in proto:  # the fork server keeps no descriptor of the judge's protocol
        os.close(fd)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the judge gone -> we die (and with pidns, every job with us)
    if os.getppid() == 1 and "pidns" not in have:
        os._exit(1)
    if "pidns" not in have:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a job come back to us, so we can kill them
    prefix_in_tmp = any(p == "/tmp" or p.startswith("/tmp/")
                        for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)))
    job_root = "/dev/shm" if prefix_in_tmp else "/tmp"
    if "mountns" in have:
        try:
            fs_notes, private_proc = _private_filesystem(job_root, cfg["tmpfs_mb"], remount_proc="pidns" in have,
                                                         expose_python=root and "setuid" in want)
            notes += fs_notes
            if private_proc:
                have.add("privateproc")
        except OSError as e:
            have.discard("mountns")
            notes.append(f"private filesystem failed: {e}")
    if "mountns" not in have:  # (not tempfile.mkdtemp: tempfile imports random, whose at-fork hook costs every job)
        job_root = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pairloop-sandbox-{os.urandom(6).hex()}")
        os.mkdir(job_root, 0o711)  # enterable, not listable, by the job uid
        os.mkdir(os.path.join(job_root, "job"), 0o700)
    if "setuid" in want:
        why = _can_switch_uid(cfg["uid"]) if root else "not root"
        if "userns" in have:
            why = "user-namespace mode maps a single uid, so jobs share the fork server's"
        if why is None:
            have.add("setuid")
        else:
            notes.append(f"jobs keep our uid: cannot switch to an unprivileged one ({why})")
    if "userns" in have:
        try:
            _drop_capabilities()
        except OSError as e:  # keeping namespace capabilities would let a job undo its read-only view
            raise RuntimeError(f"cannot drop capabilities inside the user namespace: {e}") from e
    if "seccomp" in want:
        if _seccomp_program() is not None:
            have.add("seccomp")
        else:
            notes.append(f"no seccomp filter on {os.uname().machine} (only x86-64 has a syscall table here)")
    return "zygote", zygote_end, have, notes, job_root

class CandidateError(Exception):
    """In the judge: stands for an exception of a class that is not a builtin, raised by the candidate."""


class _JobEnded(BaseException):
    """In the judge: the job process can answer no more calls (it died, hung, or broke the protocol)."""


class _Diverged(BaseException):
    """In the judge: the test made a call other than the planned one the job is already answering."""


class _Unsendable(Exception):
    """In the judge: the test passes the candidate a value the plain-data encoding has no form for."""


def _strict(x):
    """Encode a value the judge sends (test arguments): an opaque value is refused, not sent."""
    out = _encode(x)
    stack = [out]
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
        elif type(v) is dict:
            if "o" in v:
                raise _Unsendable(f"the test passes the candidate a {v['o']}, which has no plain-data form")
            stack.extend(v.values())
    return out


def _classify(exc: BaseException) -> str:
    return next((o for cls, o in EXCEPTION_OUTCOMES if isinstance(exc, cls)), "OTHER_EXCEPTION")


def _describe(exc: BaseException) -> tuple[str, str]:
    try:
        etype = type(exc).__name__[:128]
    except BaseException:
        etype = "?"
    try:
        msg = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
    except BaseException:
        msg = "<unprintable exception>"
    return etype, msg[:_MSG_MAX]


class ForkServer:
    """pid 1 of the jobs' pid namespace: forks one job process per job the judge sends; never runs model code."""

    def __init__(self, cfg: dict, features: set[str], job_root: str, user_tasks: int | None,
                 sock: socket.socket) -> None:
        lim = cfg["limits"]
        self.wall_s = float(lim["wall_s"])
        self.mem_bytes = int(lim["memory_mb"]) << 20
        self.fsize_bytes = int(lim["file_size_mb"]) << 20
        self.max_procs = int(lim["max_procs"])
        self.out_cap = int(lim["max_output_bytes"])
        self.features = features
        self.sock = sock
        self.inbuf = bytearray()
        self.uid = cfg["uid"] if "setuid" in features else None
        # RLIMIT_NPROC counts every task (process or thread) of the job's real uid. With a uid of its own that is
        # the job alone; otherwise it is all of this user's tasks, so allow what runs now plus a margin (a fork
        # bomb still stops; the margin absorbs the user starting more later).
        self.nproc = self.max_procs if self.uid is not None else (
            None if user_tasks is None else user_tasks + self.max_procs + 256)
        self.job_dir = os.path.join(job_root, "job")
        self.job_root = job_root
        self.seccomp = _seccomp_program() if "seccomp" in features else None
        self.page = mmap.mmap(-1, _OUT_AT + max(self.out_cap, 1))
        self.devnull = os.open(os.devnull, os.O_RDWR)
        # Freed when reporting a MemoryError, so the report itself fits. bytes() is calloc'd: untouched zero pages,
        # so it costs address space but no page-table entries to copy at each fork.
        self.ballast = bytes(1 << 20)
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
        _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, /proc/1/fd, /proc/1/mem or /proc/1/environ for a same-uid job
        if self.seccomp is not None:  # loaded here, once: every job process inherits it (no ctypes call per job)
            _load_seccomp(self.seccomp)

    def serve(self) -> None:
        while True:
            frame, fds = self._recv()
            if frame is None:
                for fd in fds:
                    os.close(fd)
                return
            try:
                if len(fds) != 2:
                    raise RuntimeError(f"expected 2 descriptors with a job, got {len(fds)}")
                status = self.run(frame["program"], frame["entry"], fds[0], fds[1], frame["cpu"])
            except Exception as e:  # ours, not the job's (e.g. fork failed): report it, clean up, carry on
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                status = {"fork_error": f"{type(e).__name__}: {e}"[:_MSG_MAX]}
                self.recover()  # if this raises too, we exit and the judge reports the worker lost
            self.sock.sendall(_pack(status))

    def _recv(self):
        fds: list[int] = []
        buf = self.inbuf
        while True:
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = 4 + int.from_bytes(buf[:4], "big")
                body = bytes(buf[4:n])
                del buf[:n]
                if body == _STOP[4:]:  # the judge's stop for a job that had ended by itself: nothing to do
                    continue
                return json.loads(body), fds  # (a stop and the next job can come in one read: fds are the job's)
            data, got, _, _ = socket.recv_fds(self.sock, _READ_CHUNK, 4)
            fds += got
            if not data:
                return None, fds
            buf += data

    def run(self, program: str, entry_point: str, call_r: int, reply_w: int, cpu_s: float) -> dict:
        page = self.page
        page[:_MSG_AT] = bytes(_MSG_AT)
        pid = os.fork()
        if pid == 0:
            try:
                self._child(program, entry_point, call_r, reply_w, cpu_s)
            finally:
                os._exit(_EXIT_HARNESS_FELL_THROUGH)
        os.close(call_r)  # the job's ends of its channel: held only by the job from now on
        os.close(reply_w)
        wall_killed = self._wait_or_kill(pid)
        _, status, ru = os.wait4(pid, 0)
        self._kill_leftovers()
        out_len = min(struct.unpack_from("<I", page, _OUTLEN_AT)[0], self.out_cap)
        msg_len = min(struct.unpack_from("<I", page, 8)[0], _MSG_MAX)
        result = {"status": status, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
                  "wall_killed": wall_killed,
                  "output": page[_OUT_AT:_OUT_AT + out_len].decode("utf-8", "replace"),
                  "setup": page[_MSG_AT:_MSG_AT + msg_len].decode("utf-8", "replace")}
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


    def _stop_asked(self) -> bool:
        """Read what the judge sent during a job: True once it holds a stop frame (or the judge went away)."""
        data = self.sock.recv(_READ_CHUNK)
        if not data:
            return True
        self.inbuf += data
        buf = self.inbuf
        if len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
            n = 4 + int.from_bytes(buf[:4], "big")
            if bytes(buf[:n]) == _STOP:
                del buf[:n]
                return True
        return False

    def _wait_or_kill(self, pid: int) -> bool:
        """Block until the child exits, the judge stops it (it has its verdict while the job still answers planned
        calls) or the wall-clock backstop passes; SIGKILL it in the last two cases. True if the backstop killed."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            try:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.register(self.sock.fileno(), select.POLLIN)
                deadline = _now() + self.wall_s
                while (left := deadline - _now()) > 0:
                    ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
                    if pidfd in ready:
                        return False
                    if ready and self._stop_asked():
                        os.kill(pid, signal.SIGKILL)
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

    # -- in the job process (forked): set up, run the program, answer calls ---------------------------------
    def _child(self, program: str, entry_point: str, call_r: int, reply_w: int, cpu_s: float) -> None:
        page = self.page
        write, read, exit_ = os.write, os.read, os._exit  # bound before the program can patch `os`
        try:
            os.setsid()
            calls, replies = 3, 4
            hi_r = os.dup(call_r)
            hi_w = os.dup(reply_w)
            while hi_r <= replies or hi_w <= replies:  # get both out of the way of fds 3 and 4
                hi_r, hi_w = os.dup(hi_r), os.dup(hi_w)
            for fd in (0, 1, 2):
                os.dup2(self.devnull, fd)
            os.dup2(hi_r, calls)
            os.dup2(hi_w, replies)
            os.closerange(replies + 1, self.maxfd)  # the fork server's socket, anything else inherited
            os.chdir(self.job_dir)
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                os.write(fd, b"1000")  # if memory runs out, the kernel kills the job first
                os.close(fd)
            except OSError:
                pass
            # AS, FSIZE, CORE, NPROC, SIGXFSZ and no_new_privs come from the fork server (see __init__).
            cpu_soft = math.ceil(cpu_s) + 1  # backstop if the job ignores SIGPROF (CPU counts from fork)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 1))
            if self.uid is not None:
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            if "pidns" not in self.features:  # else the namespace dies with the fork server anyway
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.setitimer(signal.ITIMER_PROF, cpu_s)  # precise CPU limit (this job's); default action kills
            if not _write_all(replies, _OK):
                exit_(0)
        except BaseException as e:
            b = f"{type(e).__name__}: {e}".encode()[:_MSG_MAX]
            page[_MSG_AT:_MSG_AT + len(b)] = b
            struct.pack_into("<I", page, 8, len(b))
            os._exit(_EXIT_SETUP_FAILED)

        def put(data: bytes) -> None:
            """All of `data` to the judge; a closed pipe means the judge is done with us."""
            view = memoryview(data)
            try:
                while view:
                    view = view[write(replies, view):]
            except OSError:
                exit_(0)

        def send(obj) -> None:
            put(_pack(obj))

        def fail(exc: BaseException, phase: str, outcome: str | None = None) -> None:
            if isinstance(exc, MemoryError):
                self.ballast = None
            exc.__traceback__ = None  # drop frames (and whatever a memory bomb holds) before formatting
            etype, msg = _describe(exc)
            send(["fail", phase, outcome or _classify(exc), etype, msg])
            exit_(0)

        sys.stdout = sys.stderr = self.sink
        module = types.ModuleType("__candidate__")  # not "__main__": main-guarded demo code does not run
        sys.modules["__candidate__"] = module
        ns = module.__dict__
        ns["__builtins__"] = builtins
        try:
            code = compile(program, "<program>", "exec", dont_inherit=True)
        except (MemoryError, RecursionError) as e:
            fail(e, "definition")
        except BaseException as e:  # SyntaxError, IndentationError, TabError, ValueError (null bytes)
            fail(e, "definition", "SYNTAX_ERROR")
        try:
            exec(code, ns)
        except BaseException as e:
            fail(e, "definition")
        fn = ns.get(entry_point)
        if fn is None:
            fail(NameError(f"the program does not define {entry_point!r}"), "test")
        put(_DEFINED)
        buf = b""
        decode = _TAGGED.decode
        while True:
            try:  # the next call: [args, kwargs]; EOF when the judge is done with us
                while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                    chunk = read(calls, _READ_CHUNK)
                    if not chunk:
                        exit_(0)
                    buf += chunk
                n = 4 + int.from_bytes(buf[:4], "big")
                frame, buf = decode(buf[4:n].decode()), buf[n:]
            except Exception:
                exit_(0)
            try:
                args, kwargs = frame
                result = fn(*args, **kwargs)
            except Exception as e:
                if isinstance(e, MemoryError):
                    self.ballast = None
                e.__traceback__ = None
                etype, msg = _describe(e)
                base = next((c.__name__ for c in type(e).__mro__ if getattr(builtins, c.__name__, None) is c),
                            "Exception")
                send(["raise", _classify(e), etype, base, msg])
                continue
            except BaseException as e:  # SystemExit, KeyboardInterrupt, ...: the job tried to end itself
                fail(e, "test")
            try:
                data = _pack(["ret", _encode(result)])
            except BaseException:  # e.g. a self-containing list (RecursionError)
                data = None
            if data is None or len(data) > _MAX_FRAME:
                data = _pack(["ret", {"o": type(result).__name__}])
            put(data)


# --- the judge: runs the test code against a proxy of the job's entry point, decides the verdict ----------------

class _Candidate:
    """`candidate` in the test code: each call goes to the job process; its answer comes back as plain data."""

    def __init__(self, judge: "Judge", name: str) -> None:
        self._judge = judge
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self._judge.call(args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate {self.__name__}>"


class Judge:
    """Holds the test code (the job never sees it) and the only power to say PASS. Never runs model code."""

    def __init__(self, cfg: dict, sock: socket.socket) -> None:
        lim = cfg["limits"]
        self.cpu_s = float(lim["cpu_s"])
        self.wall_s = float(lim["wall_s"])
        self.mem_bytes = int(lim["memory_mb"]) << 20
        self.sock = sock
        self.status_reader = _Reader(sock.fileno())
        self.tests: dict[tuple, tuple] = {}
        # (test, prompt, entry point) -> the call frames a passing job got, in order; None: the test's calls vary
        # from job to job (random inputs), so it goes call by call
        self.plans: dict[tuple, list[bytes] | None] = {}
        self.planning = bool(cfg.get("call_plans", True))
        self.zygote_lost: str | None = None

    def _compiled(self, test: str, prompt: str | None):
        key = (test, prompt)
        entry = self.tests.get(key)
        if entry is None:
            try:
                test_code = compile(test, "<test>", "exec", dont_inherit=True)
            except BaseException as e:  # a broken problem set is not the model's failure
                return None, f"test code does not compile: {type(e).__name__}: {e}"[:_MSG_MAX]
            prompt_code = None
            if prompt:
                try:  # a HumanEval prompt is code (its helpers, and the entry point's stub); a chat prompt is not
                    prompt_code = compile(prompt, "<prompt>", "exec", dont_inherit=True)
                except BaseException:
                    prompt_code = None
            if len(self.tests) >= 512:
                self.tests.clear()
            entry = self.tests[key] = (prompt_code, test_code)
        return entry, None

    def run(self, idx: int, program: str, test: str, entry_point: str, prompt: str | None,
            cpu_s: float | None = None) -> list:
        key = (test, prompt, entry_point)
        result = self._run(idx, program, test, entry_point, prompt, cpu_s, self.plans.get(key) or [])
        if result[1] == "DIVERGED":  # the planned job answered calls this test did not make: redo it call by call
            self.plans[key] = None
            spent = result[5]
            result = self._run(idx, program, test, entry_point, prompt, cpu_s, [])
            result[5] += spent
        elif result[1] == "PASS" and self.planning and key not in self.plans:  # the calls a passing job got: the next job's plan
            if len(self.plans) >= 512:
                self.plans.clear()
            plan, size = [], 0
            for frame in self.sent:
                size += len(frame)
                if size > _PLAN_MAX_BYTES:
                    break
                plan.append(frame)
            self.plans[key] = plan
        return result

    def _run(self, idx: int, program: str, test: str, entry_point: str, prompt: str | None,
             cpu_s: float | None, plan: list[bytes]) -> list:
        self.job_cpu_s = self.cpu_s if cpu_s is None else min(float(cpu_s), self.cpu_s)  # Job.cpu_s, if given
        compiled, err = self._compiled(test, prompt)
        if compiled is None:
            return [idx, "INFRA_ERROR", None, CAUSE_TEST_CODE, err, 0.0, ""]
        self.plan, self.sent, self.diverged = plan, [], False  # sent: the call frames of this job, in order
        call_r, self.call_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        os.set_blocking(self.call_w, False)
        self.replies = _Reader(self.reply_r, _MAX_FRAME + 4096, tagged=True)
        self.deadline = _now() + self.wall_s + 5.0
        self.ended: str | None = None  # why the job can answer no more
        self.aborted: tuple | None = None  # (outcome, etype, msg) when the candidate tried to end the process
        self.raised: dict[int, tuple] = {}
        try:
            data = _pack({"program": program, "entry": entry_point, "cpu": self.job_cpu_s})
            try:
                sent = socket.send_fds(self.sock, [data[:1 << 16]], [call_r, reply_w])
                self.sock.sendall(data[sent:])
            except OSError as e:
                self.zygote_lost = f"fork server unreachable: {e}"
        finally:
            os.close(call_r)
            os.close(reply_w)
        if plan and self.zygote_lost is None:
            # the planned calls, before the job starts: it answers them one after another, no round trip each
            written, fault = _write_plan(self.call_w, b"".join(plan))
            if fault is not None:
                self.zygote_lost = fault
            elif not written:  # the job has already ended: its calls (if any) go call by call and find it gone
                self.plan = []
        verdict = None
        if self.zygote_lost is None:
            verdict = self._judge(compiled, entry_point)
            if len(self.sent) < len(self.plan) and verdict[0] != "DIED" and self.ended is None \
                    and self.aborted is None and verdict[1] != "definition":
                try:  # the verdict is in while the job may still answer planned calls: the fork server kills it
                    self.sock.sendall(_STOP)
                except OSError as e:
                    self.zygote_lost = f"fork server unreachable: {e}"
        os.close(self.call_w)  # EOF: the job process leaves
        os.close(self.reply_r)
        status = None
        if self.zygote_lost is None:
            try:
                status = self.status_reader.read(self.deadline + 5.0)
            except (OSError, ValueError) as e:
                status = None
                self.zygote_lost = f"fork server sent a bad status: {e}"
            if status is None and self.zygote_lost is None:
                self.zygote_lost = "the fork server died or stopped answering during this job"
        cpu = float(status.get("cpu", 0.0)) if status else 0.0
        output = status.get("output", "") if status else ""
        if status and "fork_error" in status:
            return [idx, "INFRA_ERROR", None, CAUSE_FORK, f"fork server: {status['fork_error']}", cpu, output]
        if verdict is None and status is None:  # never got to the job: ours
            return [idx, "INFRA_ERROR", None, CAUSE_FORK, self.zygote_lost, 0.0, ""]
        if status is None and verdict[0] != "DIED":  # it killed or stopped its fork server: never a PASS
            verdict = ("DIED", verdict[1] or "test", "answered" if verdict[0] == "PASS" else "failed", None)
        if verdict[0] == "DIED":
            verdict = self._death(status, verdict[1], verdict[2], cpu)
        if self.diverged:  # whatever this job did after the planned call it got instead is not the test's result
            verdict = ("DIVERGED", None, None, None)
        outcome, phase, etype, msg = verdict
        return [idx, outcome, phase, etype, msg, cpu, output]

    def _judge(self, compiled, entry_point: str) -> tuple:
        """(outcome, phase, error type, message), or ("DIED", phase, why, None) to be classified from the exit."""
        first = self._reply()
        if first != ["ok"]:  # no model code has run yet: whatever happened is ours
            return "DIED", None, "before its set-up finished", None
        msg = self._reply()
        if msg != ["defined"]:
            if type(msg) is list and len(msg) == 5 and msg[0] == "fail" and msg[1] in ("definition", "test") \
                    and msg[2] in _JOB_OUTCOMES and all(type(m) is str for m in msg[3:]):
                return msg[2], msg[1], msg[3][:128] or None, msg[4][:_MSG_MAX] or None
            why = self.ended or ("died before it finished defining" if msg is None else "sent a malformed message")
            return "DIED", "definition", why, None
        prompt_code, test_code = compiled
        proxy = _Candidate(self, entry_point)
        ns = {"__builtins__": builtins, "__name__": "__test__"}
        if prompt_code is not None:
            try:
                exec(prompt_code, ns)  # the problem's own helpers (e.g. `poly` in HumanEval/32), trusted code
            except Exception:
                pass  # e.g. a prompt that imports what is not installed: its helpers stay missing
        ns[entry_point] = proxy  # tests that call the entry point by its own name (HumanEval/33) get the proxy too
        try:
            exec(test_code, ns)
        except BaseException as e:
            return "INFRA_ERROR", None, CAUSE_TEST_CODE, f"test code raised {type(e).__name__}: {e}"[:_MSG_MAX]
        check = ns.get("check")
        if not callable(check):
            return "INFRA_ERROR", None, CAUSE_TEST_CODE, "the test code does not define check()"
        final = None
        try:
            check(proxy)
        except BaseException as e:
            final = e
        # The job's state comes first: a test that swallows exceptions can't turn a dead job into a PASS.
        if self.ended is not None:
            return "DIED", "test", self.ended, None
        if self.aborted is not None:
            return self.aborted[0], "test", self.aborted[1], self.aborted[2]
        if final is None:
            return "PASS", None, None, None
        carried = self.raised.get(id(final))
        if carried is not None and carried[0] is final:  # the candidate's own exception, uncaught by the test
            return carried[1], "test", carried[2], carried[3]
        if isinstance(final, _Unsendable):
            return "INFRA_ERROR", None, CAUSE_TEST_INPUT, str(final)[:_MSG_MAX]
        if isinstance(final, NameError):  # the test code itself needs a name the judge lacks: not the model's
            return "INFRA_ERROR", None, CAUSE_TEST_NAME, (
                f"the test needs a name the judge does not have ({final}); a helper of the problem's prompt must "
                "come in Job.prompt")[:_MSG_MAX]
        final.__traceback__ = None
        etype, msg = _describe(final)
        return _classify(final), "test", etype, msg or None

    def _reply(self):
        try:
            return self.replies.read(self.deadline)
        except (ValueError, TypeError, RecursionError, MemoryError) as e:
            self.ended = f"sent a malformed reply ({type(e).__name__})"
            return None
        except OSError as e:
            self.ended = f"reply channel failed ({e})"
            return None

    def call(self, args: tuple, kwargs: dict):
        if self.diverged:
            raise _Diverged
        if self.ended is not None or self.aborted is not None:
            raise _JobEnded(self.ended or "the candidate ended the process")
        data = _pack([_strict(list(args)), _strict(kwargs)])
        i = len(self.sent)
        if i < len(self.plan):  # already written: the job answers it (or has) in this order
            if data != self.plan[i]:
                self.diverged = True
                raise _Diverged
        elif not _write_all(self.call_w, data, self.deadline):
            self.ended = self.ended or "stopped reading its calls"
            raise _JobEnded(self.ended)
        self.sent.append(data)
        reply = self._reply()
        if reply is None:
            self.ended = self.ended or "died while answering a call"
            raise _JobEnded(self.ended)
        if type(reply) is list and len(reply) == 2 and reply[0] == "ret":
            return reply[1]
        if type(reply) is list and len(reply) == 5 and reply[0] == "raise" and reply[1] in _JOB_OUTCOMES \
                and all(type(r) is str for r in reply[2:]):
            _, outcome, etype, base, msg = reply
            cls = getattr(builtins, base, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = CandidateError
            try:
                exc = cls(msg)
            except Exception:
                exc = CandidateError(msg)
            self.raised[id(exc)] = (exc, outcome, etype[:128], msg[:_MSG_MAX] or None)
            raise exc
        if type(reply) is list and len(reply) == 5 and reply[0] == "fail" and reply[2] in _JOB_OUTCOMES \
                and all(type(r) is str for r in reply[3:]):
            self.aborted = (reply[2], reply[3][:128], reply[4][:_MSG_MAX] or None)
            raise _JobEnded("the candidate ended the process")
        self.ended = "sent a malformed reply"
        raise _JobEnded(self.ended)

    def _death(self, status: dict | None, phase: str | None, why: str, cpu: float) -> tuple:
        """Outcome of a job that stopped answering, from how its process ended (the fork server saw it)."""
        if status is None:
            return "CRASHED", phase, None, f"the job {why}, and its fork server died or stopped answering " \
                                           "(killed or stopped by the job)"
        if phase is None:  # before any model code ran
            setup = status.get("setup") or f"job process exited with status {status.get('status')}"
            return "INFRA_ERROR", None, CAUSE_JOB_SETUP, f"job setup failed: {setup}"[:_MSG_MAX]
        raw = int(status.get("status", 0))
        if status.get("wall_killed"):
            return "TIMEOUT", phase, None, f"wall-clock limit {self.wall_s:g}s exceeded ({cpu:.2f}s CPU)"
        if os.WIFSIGNALED(raw):
            sig = os.WTERMSIG(raw)
            name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
            if sig in (signal.SIGPROF, signal.SIGXCPU) or (sig == signal.SIGKILL and cpu >= self.job_cpu_s):
                return "TIMEOUT", phase, None, f"CPU limit {self.job_cpu_s:g}s exceeded"
            rss = int(status.get("maxrss_kb", 0))
            if rss * 1024 >= 0.8 * self.mem_bytes:
                return "MEMORY", phase, name, f"killed by {name} at {rss >> 10} MiB resident " \
                                              f"(limit {self.mem_bytes >> 20} MiB)"
            return "CRASHED", phase, name, f"killed by {name}"
        code = os.waitstatus_to_exitcode(raw)
        return "CRASHED", phase, None, f"the job {why}: exited with status {code} without an answer"


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
    # counted before entering namespaces: the kernel counts the real uid's tasks host-wide (root: no limit)
    user_tasks = None if os.geteuid() == 0 else _user_task_count(os.getuid())
    role = _isolate(cfg, (proto_in, proto_out))
    if role[0] == "zygote":
        _, sock, features, notes, job_root = role
        if missing:
            notes.append(f"could not preload {', '.join(missing)}")
        server = ForkServer(cfg, features, job_root, user_tasks, sock)
        sock.sendall(_pack({"features": sorted(features), "notes": notes, "job_root": job_root}))
        # Warm the compiler's heap once: a job's compile then reuses pages the fork server already has, instead of
        # growing the heap in the job (measured: 240 -> 87 page faults to compile a 2-line program).
        with open(__file__) as f:
            compile(f.read(), "<warm-up>", "exec", dont_inherit=True)
        gc.collect()
        gc.freeze()  # children's collections skip everything imported so far: fewer copy-on-write faults
        # Hand the heap's free pages back: fork server RSS 21.4 -> 18.7 MB (anonymous 16.3 -> 13.6), fewer page-table
        # entries to copy at each fork; completions/s moved within noise (docs/benchmarks.md, Executor throughput).
        _libc.malloc_trim(0)
        try:
            server.serve()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if "mountns" not in features:
                shutil.rmtree(job_root, ignore_errors=True)
        os._exit(0)
    _, zygote, sock = role
    _prctl(PR_SET_DUMPABLE, 0)  # a same-uid job can't ptrace us or reopen our descriptors (it can't see us either)
    judge = Judge(cfg, sock)
    ready = judge.status_reader.read(_now() + 60.0)
    if ready is None:
        print("sandbox worker: the fork server did not start (its error is above)", file=sys.stderr)
        return 1
    if "userns" in ready["features"]:
        _drop_capabilities()  # the judge needs none either
    out = _pack(["ready", ready["features"], ready["notes"], ready["job_root"]])
    _write_all(proto_out, out)
    jobs = _Reader(proto_in)
    while True:
        try:
            frame = jobs.read()
        except (ValueError, OSError):
            return 1
        if frame is None:
            break
        idx, program, test, entry_point, prompt, cpu_s = frame
        try:
            result = judge.run(idx, program, test, entry_point, prompt, cpu_s)
        except Exception as e:  # ours: report it and start over
            result = [idx, "INFRA_ERROR", None, "judge", f"judge: {type(e).__name__}: {e}"[:_MSG_MAX], 0.0, ""]
            judge.zygote_lost = judge.zygote_lost or "judge failed"
        if not _write_all(proto_out, _pack(result)):
            break
        if judge.zygote_lost is not None:  # the parent starts a fresh worker; jobs it queued here never started
            _write_all(proto_out, _pack(["lost", judge.zygote_lost]))
            return 1
    sock.close()  # EOF: the fork server exits
    os.waitpid(zygote, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
