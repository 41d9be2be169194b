"""Which malloc DPO training runs under, and the child process that gives it jemalloc.

On CPU, glibc's malloc hands the big blocks a training step frees (activations, gradients: mmap'd, above its
threshold) back to the kernel at once, and the next step faults them in again, page by page: measured on the AMX
Xeon with run 4's pairs (docs/benchmarks.md, "The allocator under DPO"), 45.6M minor faults and 34% of the CPU in
the kernel; under jemalloc with decay off (freed memory kept for reuse) 1.3M faults, 1% in the kernel, 1.72x the
pairs/s, the same peak RSS. glibc's knobs (mallopt thresholds, THP) were tried and did not get there.

A process cannot swap its malloc once it runs, so `train.allocator` = `jemalloc` (or `auto` where it applies)
runs the training in a child process started with `LD_PRELOAD` (the driver of `pairloop run`, its Ray engines and
the sandbox keep glibc's). torch's CPU allocator aligns every tensor to 64 bytes whatever malloc returns, so the
numbers do not depend on the allocator: it is recorded in the manifest, not in the adapter's identity.

    auto      the process's own malloc (jemalloc with decay off grew the training child's RSS ~1 GB a minute,
              to 21 GB over 16 steps of run 5's DPO: not a safe default beside live engines)
    jemalloc  jemalloc or an error (the library missing, or several processes: preload it in the launch command)
    system    the process's own malloc, in process
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ALLOCATORS = ("auto", "jemalloc", "system")

# Where distributions put it (Debian/Ubuntu multiarch, Fedora/RHEL, a source build); PAIRLOOP_JEMALLOC overrides.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# Decay off: freed pages stay with the process for reuse (what removes the page faults). The child is the training
# and nothing else, and its peak RSS measured the same as glibc's.
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
CHILD_ENV = "PAIRLOOP_TRAIN_CHILD"  # set in the child (to the reason): it must find jemalloc loaded, never spawn


@dataclass(frozen=True)
class Plan:
    name: str  # "jemalloc" | "system"
    child: bool  # start a child process under LD_PRELOAD (False: this process already runs the chosen malloc)
    lib: str | None  # the library jemalloc comes from
    why: str
    released: bool | None = None  # jemalloc: its kept memory given back after the optimizer steps (release_retained)

    def record(self) -> dict:
        """What the manifest records."""
        return {"name": self.name, "lib": self.lib, "why": self.why, "released_after_steps": self.released,
                "malloc_conf": os.environ.get("MALLOC_CONF", MALLOC_CONF) if self.name == "jemalloc" else None}


def find_jemalloc() -> str | None:
    """Path of libjemalloc.so.2, or None. PAIRLOOP_JEMALLOC names one explicitly (it must exist)."""
    explicit = os.environ.get("PAIRLOOP_JEMALLOC")
    if explicit:
        if not os.path.isfile(explicit):
            raise ValueError(f"PAIRLOOP_JEMALLOC={explicit!r}: no such file")
        return explicit
    return next((p for p in JEMALLOC_PATHS if os.path.isfile(p)), None)


def loaded_jemalloc(maps: str | None = None) -> str | None:
    """The jemalloc library mapped into this process (preloaded), or None."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libjemalloc"):
            return fields[5].strip()
    return None


def plan(asked: str, cuda: bool, world_size: int, lib: str | None, loaded: str | None) -> Plan:
    """Where training runs and under which malloc. Pure: the caller probes the machine (`resolve`)."""
    if asked not in ALLOCATORS:
        raise ValueError(f"train.allocator={asked!r}: must be one of {list(ALLOCATORS)}")
    if loaded:  # preloaded by the user or by our own parent: already the process we want
        if asked == "system":
            return Plan("jemalloc", False, loaded, "train.allocator=system, but this process was started with "
                        "jemalloc preloaded (LD_PRELOAD): it cannot be unloaded")
        return Plan("jemalloc", False, loaded, "jemalloc already preloaded in this process")
    if asked == "system":
        return Plan("system", False, None, "set by train.allocator")
    if world_size > 1:
        if asked == "jemalloc":
            raise ValueError(f"train.allocator=jemalloc with {world_size} processes (accelerate launch): each "
                             "would start a child; preload it in the launch command instead "
                             f"(LD_PRELOAD={lib or 'libjemalloc.so.2'} MALLOC_CONF={MALLOC_CONF})")
        return Plan("system", False, None, f"auto: {world_size} processes (accelerate launch); preload jemalloc in "
                    "the launch command to use it")
    if lib is None:
        if asked == "jemalloc":
            raise ValueError(f"train.allocator=jemalloc: no libjemalloc.so.2 in {list(JEMALLOC_PATHS)} "
                             "(Debian/Ubuntu: apt install libjemalloc2; or set PAIRLOOP_JEMALLOC to its path)")
        return Plan("system", False, None, "auto: the process's own malloc (no libjemalloc.so.2 installed)")
    if asked == "auto":  # measured in run 5: decay off grows the child ~1 GB a minute (21 GB after 16 steps)
        return Plan("system", False, None, "auto: the process's own malloc; train.allocator=jemalloc is 1.5-1.7x "
                    "the DPO pairs/s on CPU, but its resident memory grew to 21 GB over run 5's 16 steps (opt in "
                    "where memory allows)")
    return Plan("jemalloc", True, lib, "set by train.allocator")


def resolve(asked: str, cuda: bool) -> Plan:
    """`plan` for this process and machine. In the child, jemalloc must be what got loaded (fail closed)."""
    loaded = loaded_jemalloc()
    parent_why = os.environ.get(CHILD_ENV)
    if parent_why:
        if not loaded:
            raise RuntimeError(f"train: started as the jemalloc child ({CHILD_ENV} set) but no jemalloc is mapped "
                               f"into the process: LD_PRELOAD={os.environ.get('LD_PRELOAD')!r} did not load")
        return Plan("jemalloc", False, loaded, f"{parent_why} (training in a child process under LD_PRELOAD)")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return plan(asked, cuda, world, None if loaded else find_jemalloc(), loaded)


def die_with_parent() -> None:
    """In the training child before exec: SIGTERM when the process that started it dies (killed, OOM), so the
    training never runs on as an orphan."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def jemalloc_mallctl():
    """The loaded jemalloc's `mallctl(name, oldp, oldlenp, newp, newlen)` as a typed ctypes function, or None
    when this process has no jemalloc (or it exports none)."""
    import ctypes

    lib = loaded_jemalloc()
    if lib is None:
        return None
    try:
        mallctl = ctypes.CDLL(lib).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                        ctypes.c_size_t]
    return mallctl


def release_retained(decay_ms: int = 10_000) -> bool:
    """Under jemalloc with decay off: give the memory it keeps back to the kernel now, and from now on after
    `decay_ms` (jemalloc's default). Called once the optimizer steps are done: the step-to-step reuse that decay off
    buys is over, and what comes next (the hot-load probe's long sequences: logits of ~3,300 tokens x 151,936) would
    otherwise stay resident for the life of the process (run 5: the child reached 17.8 GB and Ray's memory monitor
    killed the idle engines). False when this process has no jemalloc (nothing to do) or jemalloc refused."""
    import ctypes

    mallctl = jemalloc_mallctl()
    if mallctl is None:
        return False
    narenas, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if mallctl(b"arenas.narenas", ctypes.byref(narenas), ctypes.byref(size), None, 0) != 0:
        return False
    decay = ctypes.c_ssize_t(decay_ms)
    for key in (b"arenas.dirty_decay_ms", b"arenas.muzzy_decay_ms"):  # arenas created from now on
        mallctl(key, None, None, ctypes.byref(decay), ctypes.sizeof(decay))
    for i in range(narenas.value):  # existing ones (an arena not yet initialized refuses: nothing kept there)
        for key in (b"dirty_decay_ms", b"muzzy_decay_ms"):
            mallctl(b"arena.%d.%s" % (i, key), None, None, ctypes.byref(decay), ctypes.sizeof(decay))
    return mallctl(b"arena.4096.purge", None, None, None, 0) == 0  # 4096 = MALLCTL_ARENAS_ALL


def child_env(p: Plan, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the training child: jemalloc preloaded ahead of anything already preloaded."""
    env = dict(os.environ if env is None else env)
    if not p.lib:
        raise RuntimeError(f"train: child_env needs a malloc library to preload; plan {p.name!r} has none")
    env["LD_PRELOAD"] = ":".join(x for x in (p.lib, env.get("LD_PRELOAD", "")) if x)
    env.setdefault("MALLOC_CONF", MALLOC_CONF)  # a user's own MALLOC_CONF wins (recorded in the manifest)
    env[CHILD_ENV] = p.why  # the child records the parent's reason
    here = str(Path(__file__).resolve().parents[1])  # this checkout's packages, ahead of any installed copy
    env["PYTHONPATH"] = os.pathsep.join(x for x in (here, env.get("PYTHONPATH", "")) if x)
    return env
