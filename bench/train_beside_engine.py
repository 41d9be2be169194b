"""DPO speed in a fresh process vs beside the loop's idle eval engines (`pairloop run` keeps them up through training).

    .venv/bin/python bench/train_beside_engine.py --pairs runs/experiment-cpu/pairs-balanced --steps 5

Each mode runs in its own process on the same pairs, with the `train:` and `engine:` settings of --config as
`pairloop run` reads them (default configs/experiment-cpu.yaml; its first arm's), for --steps optimizer steps:
`fresh` trains alone; `beside` first starts Ray and the config's eval engines as the loop does (weights and KV
cache resident, no requests), then trains. Prints each mode's train_runtime
(TRL's, first step included) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, config: str, pairs: str, steps: int, out: str, result: str) -> None:
    from dataclasses import replace

    from pairloop.loop import loop_configs
    from train.dpo import train

    c = loop_configs(["--config", config])
    pool = None
    if mode == "beside":
        from gen.engine import EnginePool, ensure_ray
        from gen.model_source import resolve_model

        ensure_ray()
        pool = EnginePool(c.engine, resolve_model(c.engine.model))
    cfg = replace(c.train, pairs=[pairs], out=out, max_steps=steps)
    train(cfg)
    man = json.loads((Path(out) / "train_manifest.json").read_text())
    Path(result).write_text(json.dumps({"train_runtime": man["metrics"]["train_runtime"]}))
    if pool is not None:
        pool.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", required=True, help="a pairs stage's output folder")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--config", default=str(ROOT / "configs" / "experiment-cpu.yaml"))
    p.add_argument("--child", nargs=2, metavar=("MODE", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 1:
        p.error(f"--steps={a.steps}: must be >= 1")
    if a.child:
        child(a.child[0], a.config, a.pairs, a.steps, a.out, a.child[1])
        return 0
    if not Path(a.config).is_file():
        p.error(f"--config={a.config!r}: no such file")
    if not (Path(a.pairs) / "pairs.parquet").is_file():
        p.error(f"--pairs={a.pairs!r}: no pairs.parquet there")
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fresh", "beside"):
            res = os.path.join(tmp, f"{mode}.json")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--pairs", a.pairs, "--steps", str(a.steps), "--config", a.config,
                            "--child", mode, res, "--out", os.path.join(tmp, mode)], check=True)
            got[mode] = json.loads(Path(res).read_text())["train_runtime"]
            print(f"{mode}: train_runtime {got[mode]:.1f} s for {a.steps} steps (process {time.perf_counter() - t0:.0f} s)")
    print(f"beside / fresh: {got['beside'] / got['fresh']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
