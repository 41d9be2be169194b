"""The whole loop: base eval -> gen on the train split -> pairs -> train -> eval of the adapter -> report.

    pairloop run --config configs/demo.yaml
    pairloop run --config configs/demo.yaml run.out=runs/demo2 gen.n=16

One config file, one section per stage (`run:`, `engine:`, `gen:`, `pairs:`, `train:`, `eval:`); the loop fills
in what ties the stages together (each stage's input is the previous stage's output folder under `run.out`, the
problem set and its split, the model), so those fields are not set per stage. The engines start once for the whole
run and serve base eval, gen and the adapter's eval (hot-loaded). Every stage's output is kept; a rerun skips the
stages that are complete (gen and eval also resume inside a stage, unit by unit).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pairloop.config import build_config, config_to_dict, load_config


@dataclass(frozen=True)
class LoopConfig:
    out: str = "runs/loop"  # every stage writes under here: eval/, gen/, pairs/, adapter/, report/
    problems: str = "humaneval"  # split into train (gen + pairs + train) and eval (base and adapter eval)
    eval_fraction: float = 0.5  # share of problems held out for evaluation
    split_seed: int = 0
    train_limit: int = 0  # first N train-split problems (0 = all): sizes the run
    eval_limit: int = 0  # first N eval-split problems (0 = all)

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"run.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.train_limit < 0 or self.eval_limit < 0:
            raise ValueError(f"run.train_limit/eval_limit must be >= 0, got {self.train_limit}, {self.eval_limit}")


@dataclass(frozen=True)
class StageConfigs:
    loop: Any
    engine: Any
    gen: Any
    pairs: Any
    train: Any
    eval: Any


def stage_configs(argv: list[str]) -> StageConfigs:
    """Parse every section, then wire the stages together under run.out."""
    from eval.run import EvalConfig
    from gen.engine import EngineConfig
    from gen.run import GenConfig
    from pairs.config import PairsConfig
    from train.dpo import TrainConfig

    loop = load_config(LoopConfig, argv, section="run")
    engine = load_config(EngineConfig, argv, section="engine")
    out = loop.out
    split = dict(problems=loop.problems, eval_fraction=loop.eval_fraction, split_seed=loop.split_seed)
    raw = _raw_sections(argv)
    gen = build_config(GenConfig, {**raw.get("gen", {}), **split, "split": "train", "limit": loop.train_limit,
                                   "out": os.path.join(out, "gen")})
    pairs = build_config(PairsConfig, {**raw.get("pairs", {}), "inputs": [os.path.join(out, "gen")],
                                       "out": os.path.join(out, "pairs"), "problems": loop.problems,
                                       "eval_problems": loop.problems, "eval_fraction": loop.eval_fraction,
                                       "split_seed": loop.split_seed})
    train = build_config(TrainConfig, {**raw.get("train", {}), "pairs": [os.path.join(out, "pairs")],
                                       "out": os.path.join(out, "adapter"), "model": engine.model,
                                       "max_lora_rank": engine.max_lora_rank})
    evl = build_config(EvalConfig, {**raw.get("eval", {}), **split, "split": "eval", "limit": loop.eval_limit,
                                    "out": os.path.join(out, "eval")})
    return StageConfigs(loop, engine, gen, pairs, train, evl)


def _raw_sections(argv: list[str]) -> dict[str, dict[str, Any]]:
    """Each section's values from the YAML file and section.field=value overrides (unconverted)."""
    import yaml

    from pairloop.config import parse_overrides

    sections: dict[str, dict[str, Any]] = {}
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            data = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
            for k, v in data.items():
                if isinstance(v, dict):
                    sections.setdefault(k, {}).update(v)
            i += 2
            continue
        if argv[i].startswith("--config="):
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    for sec, field, value in parse_overrides(rest):
        if sec is None:
            raise ValueError(f"pairloop run: override {field}={value!r} needs a section, e.g. gen.{field}={value}")
        sections.setdefault(sec, {})[field] = value
    unknown = sorted(set(sections) - {"run", "engine", "gen", "pairs", "train", "eval"})
    if unknown:
        raise ValueError(f"pairloop run: unknown config section(s) {unknown}; known: run engine gen pairs train eval")
    return sections


def _digest(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageLog:
    """`<out>/loop_state.json`: which stages completed with which config (atomic, written after each stage)."""

    def __init__(self, out: str) -> None:
        self.path = Path(out) / "loop_state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str, cfg: Any) -> bool:
        s = self.state["stages"].get(stage)
        return bool(s) and s["config"] == _digest(cfg)

    def mark(self, stage: str, cfg: Any, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.state["stages"][stage] = {"config": _digest(cfg), "seconds": round(seconds, 1), **(info or {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def check_disjoint(gen_cfg, eval_cfg) -> tuple[list[str], list[str]]:
    """The adapter is evaluated only on problems it never trained on."""
    from gen.run import select_problems

    train_ids = [p.id for p in select_problems(gen_cfg)]
    eval_ids = [p.id for p in select_problems(replace(gen_cfg, split=eval_cfg.split, limit=eval_cfg.limit))]
    overlap = sorted(set(train_ids) & set(eval_ids))
    if overlap:
        raise ValueError(f"eval split overlaps the training problems: {overlap[:5]} ({len(overlap)} in all)")
    return train_ids, eval_ids


def run_loop(c: StageConfigs) -> dict[str, Any]:
    import ray

    from eval.report import build_report, render_terminal, write_report
    from eval.run import run_eval
    from gen.engine import EnginePool, ensure_ray
    from gen.model_source import resolve_model
    from gen.run import print_summary, run_generation
    from pairs.run import print_summary as print_pairs_summary
    from pairs.run import run as run_pairs
    from train.dpo import train

    train_ids, eval_ids = check_disjoint(c.gen, c.eval)
    print(f"pairloop run: {c.loop.problems}: {len(train_ids)} train problems (gen, pairs), "
          f"{len(eval_ids)} held-out eval problems x {len(c.eval.seeds)} seeds x k={c.eval.k}")
    log = StageLog(c.loop.out)
    t_all = time.perf_counter()
    model_path = resolve_model(c.engine.model)
    started_ray = ensure_ray(c.gen.ray_address or None)
    pool = None

    def engines() -> EnginePool:
        nonlocal pool
        if pool is None:
            t0 = time.perf_counter()
            pool = EnginePool(c.engine, model_path)
            print(f"pairloop run: {len(pool)} engine(s) up in {time.perf_counter() - t0:.0f} s")
        return pool

    try:
        base_eval = replace(c.eval, adapters=[], include_base=True)
        if not log.done("eval_base", base_eval):
            print("\n== 1/5 base eval (held-out split)")
            t0 = time.perf_counter()
            run_eval(base_eval, c.engine, pool=engines(), report=False)
            log.mark("eval_base", base_eval, time.perf_counter() - t0)
        if not log.done("gen", c.gen):
            print("\n== 2/5 gen (train split)")
            t0 = time.perf_counter()
            res = run_generation(c.gen, c.engine, pool=engines())
            print_summary(res)
            if not res.complete:
                raise RuntimeError(f"gen incomplete: {res.failed_units}")
            log.mark("gen", c.gen, time.perf_counter() - t0, {"rows": res.rows})
        if not log.done("pairs", c.pairs):
            print("\n== 3/5 pairs")
            t0 = time.perf_counter()
            rep = run_pairs(c.pairs)
            print_pairs_summary(rep)
            log.mark("pairs", c.pairs, time.perf_counter() - t0)
        if not log.done("train", c.train):
            print("\n== 4/5 train (DPO + LoRA)")
            t0 = time.perf_counter()
            train(c.train)
            log.mark("train", c.train, time.perf_counter() - t0)
        adapter_eval = replace(c.eval, adapters=[c.train.out], include_base=True)
        if not log.done("eval_adapter", adapter_eval):
            print("\n== 5/5 adapter eval (hot-loaded) + report")
            t0 = time.perf_counter()
            run_eval(adapter_eval, c.engine, pool=engines(), report=False)
            log.mark("eval_adapter", adapter_eval, time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    from eval.run import result_dirs

    dirs = [d for ds in result_dirs(adapter_eval).values() for d in ds]
    report = build_report(dirs)
    report_dir = os.path.join(c.loop.out, "report")
    write_report(report, report_dir)
    print(render_terminal(report))
    print(f"\npairloop run: done in {(time.perf_counter() - t_all) / 60:.1f} min; report in {report_dir}/report.md")
    return report


def main(argv: list[str]) -> int:
    try:
        cfgs = stage_configs(argv)
        run_loop(cfgs)
    except ValueError as e:
        print(f"pairloop run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npairloop run: interrupted; completed stages and units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0
