"""Multi-seed re-evaluation of a base model and its adapters on running engines, then the report.

    python -m eval --config configs/demo.yaml eval.adapters=[runs/demo/adapter]
    pairloop eval --config configs/demo.yaml

Every variant (the base, then each adapter) is evaluated on the same problems and the same seeds, with k samples
per problem per seed. Adapters are hot-loaded into every running engine under a fresh vLLM name and integer id and
removed afterwards; variants run one after another, so base and adapter requests never share a batch (vLLM CPU
bug). Results are gen shards (same schema, `adapter` set), one run folder per (variant, seed), so anything that
reads shards reads results, and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gen.engine import EngineConfig, EnginePool, ensure_ray
from gen.run import GenConfig, run_generation
from tasks.problems import SPLITS
from gen.shards import join_uri


@dataclass(frozen=True)
class EvalConfig:
    out: str = "runs/eval"  # results root: <out>/<variant>/seed-<s>/ run folders, <out>/report/
    problems: str = "humaneval"
    split: str = "all"  # all | train | eval; the loop uses "eval" (the held-out part)
    eval_fraction: float = 0.5
    split_seed: int = 0
    limit: int = 0  # first N problems of the split (0 = all)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the seed's result used 3 seeds
    k: int = 1  # samples per problem per seed; pass@1 uses the unbiased estimator over k
    temperature: float = 0.2  # low but nonzero, so seeds differ (greedy would make 3 seeds identical)
    top_p: float = 0.95
    max_tokens: int = 512
    prompt_style: str = "auto"
    response_prefix: str = "```python\n"  # see gen.run.GenConfig
    include_base: bool = True
    adapters: list[str] = field(default_factory=list)  # PEFT adapter folders (train/ output)
    allow_foreign_adapter: bool = False  # skip the adapter-vs-base identity check (loudly)
    allow_train_overlap: bool = False  # evaluate an adapter on problems it was trained on (loudly; inflates pass@1)
    problems_per_unit: int = 32  # k=1 eval: one engine call per 32 problems; CPU throughput grows with batch size
    exec_workers: int = 0
    cpu_timeout_s: float = 5.0
    ray_address: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("eval.seeds is empty: give at least one seed, e.g. eval.seeds=[0,1,2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"eval.seeds has duplicates: {self.seeds}")
        if self.k <= 0:
            raise ValueError(f"eval.k must be > 0, got {self.k}")
        if self.split not in SPLITS:
            raise ValueError(f"eval.split must be one of {SPLITS}, got {self.split!r}")
        if not self.include_base and not self.adapters:
            raise ValueError("eval: nothing to evaluate (include_base=false and no adapters)")
        for a in self.adapters:
            if not os.path.isfile(os.path.join(a, "adapter_config.json")):
                raise ValueError(f"eval.adapters: {a!r} is not a PEFT adapter folder (no adapter_config.json)")


def adapter_label(path: str) -> str:
    """A label unique to the adapter's weights: folder name + short hash of its files."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("adapter_"):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return f"{Path(path).resolve().name}-{h.hexdigest()[:8]}"


def check_adapter_base(adapter: str, model_spec: str, model_path: str) -> None:
    """Refuse an adapter trained on another base model (train/'s manifest, else adapter_config.json)."""
    from gen.model_source import model_identity

    ident = model_identity(model_spec)
    manifest = os.path.join(adapter, "train_manifest.json")
    if os.path.isfile(manifest):
        m = json.loads(Path(manifest).read_text())
        base = m.get("base_model") or {}
        fp = base.get("fingerprint") if isinstance(base, dict) else None
        if fp and fp != ident["fingerprint"]:
            raise ValueError(
                f"adapter {adapter!r} was trained on {base.get('name')!r} (fingerprint {fp[:12]}), but the engines "
                f"run {ident['name']!r} (fingerprint {ident['fingerprint'][:12]})"
            )
        return
    cfg = json.loads(Path(adapter, "adapter_config.json").read_text())
    base_name = str(cfg.get("base_model_name_or_path") or "")
    names = {model_spec, model_path, os.path.abspath(model_path), ident["name"], Path(model_path).name}
    if base_name and base_name not in names and Path(base_name).name not in names:
        raise ValueError(f"adapter {adapter!r} is for base model {base_name!r}, but the engines run {ident['name']!r}")


def result_dirs(cfg: EvalConfig) -> dict[str, list[str]]:
    """Where each variant's per-seed results live (whether or not they exist yet)."""
    labels = (["base"] if cfg.include_base else []) + [adapter_label(a) for a in cfg.adapters]
    return {lab: [join_uri(cfg.out, lab, f"seed-{s}") for s in cfg.seeds] for lab in labels}


def trained_problem_ids(adapter: str) -> set[str]:
    """Problems an adapter was trained on, from the pairs files its train manifest names (empty if unknown)."""
    import pyarrow.parquet as pq

    manifest = os.path.join(adapter, "train_manifest.json")
    if not os.path.isfile(manifest):
        return set()
    ids: set[str] = set()
    for f in json.loads(Path(manifest).read_text()).get("pairs", {}).get("files", []):
        path = f.get("path")
        if path and os.path.isfile(path) and "problem_id" in pq.read_schema(path).names:
            ids |= set(pq.read_table(path, columns=["problem_id"]).column(0).to_pylist())
    return ids


def check_no_train_overlap(cfg: "EvalConfig") -> None:
    from gen.run import select_problems

    gcfg = GenConfig(problems=cfg.problems, split=cfg.split, eval_fraction=cfg.eval_fraction,
                     split_seed=cfg.split_seed, limit=cfg.limit)
    eval_ids = {p.id for p in select_problems(gcfg)}
    for a in cfg.adapters:
        overlap = sorted(eval_ids & trained_problem_ids(a))
        if overlap and not cfg.allow_train_overlap:
            raise ValueError(
                f"eval split overlaps the training problems of adapter {a!r}: {overlap[:5]} ({len(overlap)} of "
                f"{len(eval_ids)}); evaluate on held-out problems (eval.split=eval) or set eval.allow_train_overlap"
            )
        if overlap:
            print(f"WARNING: evaluating {a} on {len(overlap)} problems it was trained on", file=sys.stderr)


@dataclass
class EvalResult:
    out: str
    result_dirs: dict[str, list[str]]  # variant label -> run folders (one per seed)
    report: dict[str, Any] | None


def run_eval(cfg: EvalConfig, engine_cfg: EngineConfig, pool: EnginePool | None = None,
             report: bool = True) -> EvalResult:
    import ray

    from gen.model_source import resolve_model

    model_path = pool.model_path if pool is not None else resolve_model(engine_cfg.model)
    check_no_train_overlap(cfg)
    variants: list[tuple[str, str | None]] = [("base", None)] if cfg.include_base else []
    for a in cfg.adapters:
        if not cfg.allow_foreign_adapter:
            check_adapter_base(a, engine_cfg.model, model_path)
        else:
            print(f"WARNING: eval.allow_foreign_adapter: not checking that {a} matches the base", file=sys.stderr)
        variants.append((adapter_label(a), a))
    started_ray = ensure_ray(cfg.ray_address or None)
    own_pool = pool is None
    dirs: dict[str, list[str]] = {}
    try:
        if own_pool:
            pool = EnginePool(engine_cfg, model_path)
        for label, path in variants:
            lora = pool.load_adapter(path, name_prefix=label) if path else None
            try:
                for s in cfg.seeds:
                    gcfg = GenConfig(
                        out=join_uri(cfg.out, label, f"seed-{s}"), problems=cfg.problems, split=cfg.split,
                        eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed, limit=cfg.limit, n=cfg.k,
                        max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        prompt_style=cfg.prompt_style, response_prefix=cfg.response_prefix, seed=s, problems_per_unit=cfg.problems_per_unit, exec_workers=cfg.exec_workers,
                        cpu_timeout_s=cfg.cpu_timeout_s, adapter_name=label if path else "",
                        progress=cfg.progress,
                    )
                    res = run_generation(gcfg, engine_cfg, pool=pool, lora=lora)
                    if not res.complete:
                        raise RuntimeError(f"eval of {label} seed {s} incomplete: {res.failed_units}")
                    dirs.setdefault(label, []).append(res.out)
            finally:
                if lora is not None:
                    pool.unload_adapter(lora)
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        if started_ray and own_pool:
            ray.shutdown()
    rep = None
    if report:
        from eval.report import build_report, render_terminal, write_report

        rep = build_report([d for ds in dirs.values() for d in ds])
        write_report(rep, join_uri(cfg.out, "report"))
        print(render_terminal(rep))
    return EvalResult(cfg.out, dirs, rep)


def main(argv: list[str]) -> int:
    from pairloop.config import load_config

    try:
        cfg = load_config(EvalConfig, argv, section="eval")
        engine_cfg = load_config(EngineConfig, argv, section="engine")
        run_eval(cfg, engine_cfg)
    except ValueError as e:
        print(f"pairloop eval: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npairloop eval: interrupted; finished units are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0
