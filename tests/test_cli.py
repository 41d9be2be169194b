"""Bad input to any command: exit 2, one message naming the field and the value, no traceback, nothing written.

Run as a user runs them (a subprocess), through both doors: `pairloop <stage>` and `python -m <stage>`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "demo.yaml")

CASES = [
    ("gen", ["gen.n=0"], "gen.n must be > 0, got 0"),
    ("gen", ["gen.sampling.temperature=hot"], "gen.sampling.temperature: expected a float, got 'hot'"),
    ("gen", ["gen.execution.executor=dask"], "execution.executor must be one of ('local', 'ray'), got 'dask'"),
    ("pairs", ["pairs.inputs=[x]", "pairs.num_pairs=abc"], "pairs.num_pairs: expected an int, got 'abc'"),
    ("train", ["train.pairs=[x]", "train.out=y", "train.lora_r=32", "train.max_lora_rank=16"], "lora_r=32"),
    ("eval", ["eval.k=0"], "eval.k must be > 0, got 0"),
    ("eval", ["eval.seeds=[1,1]"], "eval.seeds has duplicates: [1, 1]"),
    ("run", ["run.eval_fraction=2"], "run.eval_fraction must be in (0, 1), got 2.0"),
    ("run", ["gen.nn=3"], "gen: unknown field(s) ['nn']"),
    ("run", ["n=3"], "needs a section"),
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("door", ["pairloop", "module"])
@pytest.mark.parametrize("cmd,args,message", CASES)
def test_bad_input_exits_2_naming_field_and_value(cmd, args, message, door, tmp_path):
    if door == "module" and cmd == "run":
        pytest.skip("`run` is the loop: it has no module of its own (pairloop run)")
    entry = ["-m", "pairloop", cmd] if door == "pairloop" else ["-m", cmd]
    proc = _run([*entry, "--config", DEMO, *args], cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line: the message, nothing else
    assert list(tmp_path.iterdir()) == []  # nothing half-written (outputs would land under cwd: runs/...)


def test_unknown_command_and_help():
    proc = _run(["-m", "pairloop", "frobnicate"], cwd=ROOT)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    proc = _run(["-m", "pairloop", "--help"], cwd=ROOT)
    assert proc.returncode == 0 and "pairloop gen" in proc.stdout
