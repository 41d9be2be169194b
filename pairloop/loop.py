"""The whole loop: base eval -> gen on the train split -> pairs -> train -> eval of the adapter -> report.

    pairloop run --config configs/demo.yaml
    pairloop run --config configs/demo.yaml run.out=runs/demo2 gen.n=16

One config file, one section per stage (`run:`, `engine:`, `gen:`, `pairs:`, `train:`, `eval:`); the loop fills
in what ties the stages together (each stage's input is the previous stage's output folder under `run.out`, the
problem set and its split, the model), so those fields are not set per stage. The engines start once for the whole
run and serve base eval, gen and the adapter's eval (hot-loaded), unless `run.gen_dtype` gives gen engines of
another dtype: then gen runs first on its own engines, and the evaluations' engines start after it. Every stage's
output is kept; a rerun skips the stages that are complete (gen and eval also resume inside a stage, unit by unit).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow.fs as pafs

from gen.shards import file_sha256
from pairloop.config import build_config, read_sections


@dataclass(frozen=True)
class LoopConfig:
    out: str = "runs/loop"  # every stage writes under here: eval/, gen/, pairs/, adapter/, report/
    problems: str = "humaneval"  # split into train (gen + pairs + train) and eval (base and adapter eval)
    # Another problem set to evaluate on (e.g. train on mbpp, evaluate on humaneval): then no split, all of
    # `problems` trains and all of `eval_problems` is evaluated; the leakage guards still compare the two by content.
    eval_problems: str = ""
    eval_fraction: float = 0.5  # share of problems held out for evaluation
    split_seed: int = 0
    train_limit: int = 0  # first N train-split problems (0 = all): sizes the run
    eval_limit: int = 0  # first N eval-split problems (0 = all)
    # With `arms:`: every arm trains on as many pairs as the arm with the fewest got (its selection is rerun with
    # that count), so a difference between arms is not a difference in data volume.
    equal_pairs: bool = True
    # The pool's engine dtype, when it should differ from engine.dtype (which the evaluations use): "" = the same.
    # The pool's numerics enter no comparison (every variant is evaluated by the eval engines, in one dtype), so
    # gen can take the fast one (`auto`: bf16 where the CPU has native bf16) while the evals stay in float32, which
    # the hot-load check needs to vouch for a lightly trained adapter (docs/benchmarks.md, "The hot-load check's
    # resolution"). When the two resolve differently, gen runs before the base eval, so each dtype's engines
    # start once.
    gen_dtype: str = ""

    def __post_init__(self) -> None:
        if self.gen_dtype not in ("", "auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"run.gen_dtype must be empty (= engine.dtype) or auto|float32|bfloat16|float16, "
                             f"got {self.gen_dtype!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"run.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.train_limit < 0 or self.eval_limit < 0:
            raise ValueError(f"run.train_limit/eval_limit must be >= 0, got {self.train_limit}, {self.eval_limit}")


@dataclass(frozen=True)
class StageConfigs:
    loop: Any
    engine: Any
    gen: Any
    pairs: Any  # the single arm's (no `arms:` section), else the first arm's
    train: Any
    eval: Any
    # arm name -> (pairs config, train config). An experiment compares arms: one pool (gen), one pairs selection
    # and one adapter per arm, every adapter and the base evaluated together in one pass. No `arms:` section: the
    # single arm "" (outputs pairs/, adapter/ as always).
    arms: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    equal_pairs: bool = True  # arms train on the same number of pairs (the smallest arm's count)
    # the command line that made these configs (the run summary records it); not part of what the configs are
    command: str = field(default="", compare=False)


ARM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ARM_SECTIONS = ("pairs", "train")  # what an arm may change; everything else is shared, so arms stay comparable


def check_arms(raw: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The `arms:` section: {name: {pairs: {...}, train: {...}}}, the overrides each arm applies on top of the
    shared `pairs:` and `train:` sections. Names and fields are checked here (wired fields are refused later)."""
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"arms: must map arm names to their overrides, got {raw!r}")
    if len(raw) < 2:
        raise ValueError(f"arms: an experiment needs at least 2 arms to compare, got {sorted(raw)}")
    out = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not ARM_NAME.match(name):
            raise ValueError(f"arms: arm name {name!r} must match {ARM_NAME.pattern} (it names output folders)")
        body = body or {}
        if not isinstance(body, dict) or set(body) - set(ARM_SECTIONS):
            raise ValueError(f"arms.{name}: may set only {ARM_SECTIONS} (got {body!r}); gen, engine and eval are "
                             "shared by every arm")
        for sec, values in body.items():
            if not isinstance(values, dict):
                raise ValueError(f"arms.{name}.{sec}: must be a mapping of fields, got {values!r}")
        out[name] = {sec: dict(body.get(sec) or {}) for sec in ARM_SECTIONS}
    return out


# What the loop sets in each stage's section (it ties the stages together): a user value there is refused, not
# silently replaced.
WIRED = {
    # gen.pass_rate_min/max: policy=adaptive spends its budget on the problems that can land in the pairs window,
    # so it is the pairs section's window (under policy=uniform they only size gen's summary, left at defaults)
    # gen.enough_exclude: the failures no arm's pairs may reject do not count toward gen.enough_per_side
    "gen": ("out", "problems", "split", "eval_fraction", "split_seed", "limit", "pass_rate_min", "pass_rate_max",
            "enough_exclude"),
    "pairs": ("inputs", "out", "problems", "eval_problems", "eval_fraction", "split_seed", "eval_ids"),
    "train": ("pairs", "out", "model", "max_lora_rank"),
    "eval": ("out", "problems", "split", "eval_fraction", "split_seed", "limit", "adapters", "include_base"),
}


def loop_configs(argv: list[str]) -> StageConfigs:
    """Parse every section (pairloop.config, the one parser), then wire the stages together under run.out."""
    from eval.run import EvalConfig
    from gen.config import GenConfig
    from gen.engine import EngineConfig
    from gen.shards import join_uri
    from pairs.config import PairsConfig
    from train.dpo import TrainConfig

    raw = read_sections(argv)
    arms_raw = check_arms(raw.get("arms"))
    sections = [(sec, raw.get(sec, {})) for sec in WIRED] + [
        (f"arms.{a}.{sec}", body[sec]) for a, body in arms_raw.items() for sec in ARM_SECTIONS]
    for where, values in sections:
        fields = WIRED[where.rsplit(".", 1)[-1]]
        clash = sorted(set(values) & set(fields))
        if clash:
            raise ValueError(f"pairloop run: {', '.join(f'{where}.{f}' for f in clash)} is set by the loop "
                             "(from run.out, run.problems, run.eval_fraction, run.split_seed, run.*_limit, "
                             f"engine.model and pairs.pass_rate_min/max); remove it from {where}")
    loop = build_config(LoopConfig, raw.get("run", {}), "run")
    from gen.shards import check_output_path

    check_output_path("run.out", loop.out)  # inside `ray job submit --working-dir`: relative outputs would vanish
    engine = build_config(EngineConfig, raw.get("engine", {}), "engine")
    out = loop.out
    split = dict(problems=loop.problems, eval_fraction=loop.eval_fraction, split_seed=loop.split_seed)
    train_split, eval_split, eval_set = "train", "eval", split
    if loop.eval_problems:  # two problem sets: all of one trains, all of the other is held out
        train_split, eval_split = "all", "all"
        eval_set = {**split, "problems": loop.eval_problems}
    gen = build_config(GenConfig, {**raw.get("gen", {}), **split, "split": train_split, "limit": loop.train_limit,
                                   "out": join_uri(out, "gen")}, "gen")

    def arm(name: str, over: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
        suffix = f"-{name}" if name else ""
        where = f"arms.{name}." if name else ""
        pairs = build_config(PairsConfig, {**raw.get("pairs", {}), **over.get("pairs", {}),
                                           "inputs": [join_uri(out, "gen")], "out": join_uri(out, f"pairs{suffix}"),
                                           "problems": loop.problems,
                                           **({"eval_problems": loop.eval_problems} if loop.eval_problems else
                                              {"eval_problems": loop.problems, "eval_fraction": loop.eval_fraction}),
                                           "split_seed": loop.split_seed},
                             f"{where}pairs")
        train = build_config(TrainConfig, {**raw.get("train", {}), **over.get("train", {}),
                                           "pairs": [join_uri(out, f"pairs{suffix}")],
                                           "out": join_uri(out, f"adapter{suffix}"), "model": engine.model,
                                           "max_lora_rank": engine.max_lora_rank}, f"{where}train")
        return pairs, train

    arms = {name: arm(name, over) for name, over in arms_raw.items()} or {"": arm("", {})}
    if gen.policy == "adaptive":  # uniform: left alone, so a new pairs window does not make gen's samples stale
        # the pool serves every arm: sample for the widest window any arm selects from
        # an outcome counts as a failing side only if every arm may reject it
        excluded = sorted(set().union(*(set(p.exclude_outcomes) for p, _ in arms.values())))
        gen = replace(gen, pass_rate_min=min(p.pass_rate_min for p, _ in arms.values()),
                      pass_rate_max=max(p.pass_rate_max for p, _ in arms.values()), enough_exclude=excluded)
        # k texts a side give at most k * max_reuse pairs (each text in up to max_reuse of them)
        need = max((-(-p.max_pairs_per_problem // p.max_reuse) for p, _ in arms.values()), default=0)
        if gen.enough_per_side and gen.enough_per_side < need:
            warnings.warn(f"gen.enough_per_side={gen.enough_per_side} stops a problem before it can fill an arm's "
                          f"pairs.max_pairs_per_problem even with every text reused pairs.max_reuse times: "
                          f"{need} per side can", RuntimeWarning, stacklevel=2)
    evl = build_config(EvalConfig, {**raw.get("eval", {}), **eval_set, "split": eval_split,
                                    "limit": loop.eval_limit, "out": join_uri(out, "eval")}, "eval")
    first_pairs, first_train = next(iter(arms.values()))
    return StageConfigs(loop, engine, gen, first_pairs, first_train, evl, arms, loop.equal_pairs,
                        " ".join(["pairloop run", *argv]))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_sha256(folder: str) -> str:
    """One hash over an adapter folder's weight and config files (what vLLM loads)."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(name.encode() + b"\0" + file_sha256(os.path.join(folder, name)).encode())
    return h.hexdigest()


class StageLog:
    """`<out>/loop_state.json`: which stages completed, with which identity (atomic, written after each stage).

    A stage's identity is its own config plus the identities of everything it reads: the model's content
    fingerprint and the engine settings that change outputs, the gen manifest, the pairs file, the adapter. A stage
    whose identity differs from the recorded one runs again, and its old output is moved aside to
    `<out>/superseded/` first, so nothing from the old run can be picked up; everything after it then sees new
    inputs and reruns too. Nothing is ever reused on a config digest alone.
    """

    def __init__(self, out: str) -> None:
        from gen.shards import join_uri, resolve

        self.out = out
        self.path = join_uri(out, "loop_state.json")
        self.state: dict[str, Any] = {"stages": {}}
        fs, path = resolve(self.path)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            with fs.open_input_stream(path) as f:
                try:
                    self.state = json.loads(f.read().decode())
                except json.JSONDecodeError:
                    raise ValueError(f"{self.path}: not valid JSON; delete it to rerun every stage") from None

    @staticmethod
    def identity(cfg: Any, inputs: dict[str, Any]) -> str:
        from gen.shards import identity_dict

        return _digest({"config": identity_dict(cfg), "inputs": inputs})

    def done(self, stage: str, ident: str) -> bool:
        s = self.state["stages"].get(stage)
        return bool(s) and ident in (s.get("identity"), s.get("alias"))

    def supersede(self, stage: str) -> None:
        """The recorded `stage` ran with another identity: move the outputs it recorded aside before it reruns."""
        from gen.shards import join_uri, resolve

        old = self.state["stages"].pop(stage, None)
        if old is None:
            return
        for uri in old.get("outputs", []):
            fs, path = resolve(uri)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                continue
            dest = join_uri(self.out, "superseded", f"{stage}-{old.get('identity', 'unknown')}",
                            os.path.basename(path.rstrip("/")))
            dfs, dpath = resolve(dest)
            if dfs.get_file_info(dpath).type != pafs.FileType.NotFound:
                dfs.delete_dir(dpath)  # the same old identity superseded twice: keep the latest copy
            dfs.create_dir(os.path.dirname(dpath), recursive=True)
            fs.move(path, dpath)
            print(f"pairloop run: {stage}'s inputs or settings changed; its old output {uri} moved to {dest}")
        self._write()

    def mark(self, stage: str, ident: str, outputs: list[str], seconds: float,
             info: dict[str, Any] | None = None) -> None:
        self.state["stages"][stage] = {"identity": ident, "outputs": outputs, "seconds": round(seconds, 1),
                                       **(info or {})}
        self._write()

    def _write(self) -> None:
        from gen.shards import write_bytes_atomic

        write_bytes_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True).encode())


def check_disjoint(gen_cfg, eval_cfg) -> tuple[list[str], list[str]]:
    """The adapter is evaluated only on problems it never trained on."""
    from gen.run import select_problems

    train_ids = [p.id for p in select_problems(gen_cfg)]
    eval_ids = [p.id for p in select_problems(replace(gen_cfg, problems=eval_cfg.problems, split=eval_cfg.split,
                                                      limit=eval_cfg.limit))]
    overlap = sorted(set(train_ids) & set(eval_ids))
    if overlap:
        raise ValueError(f"eval split overlaps the training problems: {overlap[:5]} ({len(overlap)} in all)")
    return train_ids, eval_ids


def engine_output_identity(engine: Any) -> dict[str, Any]:
    """The model's content fingerprint and the engine settings that change what it generates."""
    from gen.engine import planned_use_gpu, resolve_dtype
    from gen.model_source import model_identity

    ident = model_identity(engine.model)
    return {"model": ident["name"], "fingerprint": ident["fingerprint"],
            "dtype": resolve_dtype(engine, planned_use_gpu(engine))[0],
            "max_model_len": engine.max_model_len, "tensor_parallel_size": engine.tensor_parallel_size,
            "device": engine.device, "seed": engine.seed}


def pairs_count(out: str) -> int:
    """How many pairs a pairs stage wrote (its report.json, the pairs stage's own record)."""
    from gen.shards import join_uri, resolve

    fs, path = resolve(join_uri(out, "report.json"))
    with fs.open_input_stream(path) as f:
        return int(json.loads(f.read().decode())["pairs"])


def equalize_pairs(arms: dict[str, tuple[Any, Any]], log: StageLog, stage, named, titled, pool_ident, pairs):
    """Every arm gets the smallest arm's pair count: an arm that selected more reruns its selection asking for
    that many (selection is deterministic, so a rerun is the same). Returns the arms with their final configs."""
    counts = {arm: pairs_count(pcfg.out) for arm, (pcfg, _) in arms.items()}
    if min(counts.values()) == 0:
        raise RuntimeError(f"pairs: an arm selected no pairs ({counts}); the pool has nothing to train on")
    m = min(counts.values())
    out = {}
    for arm, (pcfg, tcfg) in arms.items():
        if counts[arm] != m:
            asked = log.state["stages"][named("pairs", arm)]["identity"]
            pcfg = replace(pcfg, num_pairs=m)
            stage(named("pairs", arm), titled(f"3/5 pairs, rerun at {m} pairs (run.equal_pairs)", arm), pcfg,
                  pool_ident, [pcfg.out], lambda p=pcfg: pairs(p), alias=asked)
            got = pairs_count(pcfg.out)
            if got != m:
                raise RuntimeError(f"pairs [{arm}]: asked for {m} pairs to match the other arms, got {got}")
        out[arm] = (pcfg, tcfg)
    print(f"pairloop run: every arm trains on {m} pairs (selected: {counts})")
    return out


def run_loop(c: StageConfigs) -> dict[str, Any]:
    import ray

    from eval.report import build_report, render_terminal, write_report
    from eval.run import add_serving, add_until_decided, adapter_label, result_dirs, run_eval, until_decided_off
    from gen.engine import EnginePool, ensure_ray
    from gen.model_source import resolve_model
    from gen.run import print_summary, run_generation
    from gen.shards import MANIFEST_NAME, join_uri
    from pairs.run import print_summary as print_pairs_summary
    from pairs.run import run as run_pairs
    from train.dpo import train

    train_ids, eval_ids = check_disjoint(c.gen, c.eval)
    print(f"pairloop run: {c.loop.problems}: {len(train_ids)} train problems (gen, pairs), "
          f"{len(eval_ids)} held-out eval problems x {len(c.eval.seeds)} seeds x k={c.eval.k}")
    log = StageLog(c.loop.out)
    t_all = time.perf_counter()
    model_path = resolve_model(c.engine.model)
    started_ray = ensure_ray(c.gen.ray_address or None)  # first: `auto` device and dtype depend on the cluster
    engine_ident = engine_output_identity(c.engine)
    gen_engine = replace(c.engine, dtype=c.loop.gen_dtype) if c.loop.gen_dtype else c.engine
    gen_ident = engine_output_identity(gen_engine)
    # gen's engines differ from the evaluations' (else `auto` resolved to engine.dtype's own and one set of engines
    # serves every stage): gen runs first, then the eval engines start once and stay up
    gen_first = gen_ident != engine_ident
    if not gen_first:
        gen_engine = c.engine  # gen's own manifest records engine.dtype as set, as without run.gen_dtype
    else:
        print(f"pairloop run: gen engines run {gen_ident['dtype']} (run.gen_dtype={c.loop.gen_dtype}), the "
              f"evaluations' {engine_ident['dtype']} (engine.dtype={c.engine.dtype})")
    pools: dict[str, EnginePool] = {}  # "gen" | "eval" -> its engines; at most one set up at a time

    def engines(which: str = "eval") -> EnginePool:
        key = "gen" if which == "gen" and gen_first else "eval"
        if key not in pools:
            for other in list(pools):  # the other dtype's engines: done with (see the stage order below)
                pools.pop(other).shutdown()
            t0 = time.perf_counter()
            pools[key] = EnginePool(gen_engine if key == "gen" else c.engine, model_path)
            print(f"pairloop run: {len(pools[key])} {key} engine(s) up in {time.perf_counter() - t0:.0f} s")
        return pools[key]

    def stage(name: str, title: str, cfg: Any, inputs, outputs, body, alias: str | None = None) -> None:
        """Run `body` unless the log holds this stage with the same identity. Each call below is made after the
        stage before it ran, so `inputs` describes what that stage just wrote. `alias`: another identity this run
        stands for (an arm's pairs rerun at the equalized count stands for the selection asked for)."""
        ident = log.identity(cfg, inputs)
        if log.done(name, ident):
            return
        log.supersede(name)
        print(f"\n== {title}")
        t0 = time.perf_counter()
        info = body() or {}
        log.mark(name, ident, outputs, time.perf_counter() - t0, {**info, **({"alias": alias} if alias else {})})

    # the base eval serves no adapter: how adapters are served (eval.adapter_mode) is not part of its identity
    # nor is until_decided (it needs adapters to compare; the adapter eval adds its seeds to the base's too)
    base_eval = replace(until_decided_off(c.eval), adapters=[], include_base=True, adapter_mode="lora")
    adapter_eval = None  # built once the adapter exists (EvalConfig checks its folder)

    def eval_base() -> None:
        run_eval(base_eval, c.engine, pool=engines(), report=False)

    def gen() -> dict[str, Any]:
        res = run_generation(c.gen, gen_engine, pool=engines("gen"))
        print_summary(res)
        if not res.complete:
            raise RuntimeError(f"gen incomplete: {res.failed_units}")
        return {"rows": res.rows}

    def pairs(cfg) -> dict[str, Any]:
        report = run_pairs(cfg)
        print_pairs_summary(report)
        return {"pairs": report["pairs"]}

    def train_adapter(cfg) -> None:
        train(cfg)

    def eval_adapter() -> dict[str, Any]:
        res = run_eval(adapter_eval, c.engine, pool=engines(), report=False)
        # kept for the report (and its rebuilds)
        return {"warnings": res.warnings, "leakage": res.leakage, "hot_load": res.hot_load, "serving": res.serving,
                "until_decided": res.until_decided, "seeds": res.seeds}

    arms = dict(c.arms) or {"": (c.pairs, c.train)}
    named = lambda what, arm: f"{what}:{arm}" if arm else what  # noqa: E731
    titled = lambda title, arm: f"{title} [{arm}]" if arm else title  # noqa: E731
    try:
        stage_base = lambda i: stage("eval_base", f"{i}/5 base eval (held-out split)", base_eval,  # noqa: E731
                                     {"engine": engine_ident}, [join_uri(c.eval.out, "base")], eval_base)
        stage_gen = lambda i: stage("gen", f"{i}/5 gen (train split, engines {gen_ident['dtype']})",  # noqa: E731
                                    c.gen, {"engine": gen_ident}, [c.gen.out], gen)
        for i, run_stage in enumerate([stage_gen, stage_base] if gen_first else [stage_base, stage_gen], 1):
            run_stage(i)
        pool_ident = {"gen_manifest": file_sha256(join_uri(c.gen.out, MANIFEST_NAME))}
        for arm, (pcfg, _) in arms.items():
            stage(named("pairs", arm), titled("3/5 pairs", arm), pcfg, pool_ident, [pcfg.out], lambda p=pcfg: pairs(p))
        if len(arms) > 1 and c.equal_pairs:
            arms = equalize_pairs(arms, log, stage, named, titled, pool_ident, pairs)
        for arm, (pcfg, tcfg) in arms.items():
            stage(named("train", arm), titled("4/5 train (DPO + LoRA)", arm), tcfg,
                  {"pairs": file_sha256(join_uri(pcfg.out, "pairs.parquet")), "model": engine_ident["fingerprint"]},
                  [tcfg.out], lambda t=tcfg: train_adapter(t))
        adapters = [t.out for _, t in arms.values()]
        adapter_eval = replace(c.eval, adapters=adapters, include_base=True)
        shas = [adapter_sha256(a) for a in adapters]
        stage("eval_adapter", "5/5 adapter eval + report", adapter_eval,
              {"engine": engine_ident, **({"adapter": shas[0]} if len(shas) == 1 else {"adapters": shas})},
              [join_uri(c.eval.out, adapter_label(a)) for a in adapters], eval_adapter)
    finally:
        for p in pools.values():
            p.shutdown()
        if started_ray:
            ray.shutdown()
    guard = log.state["stages"]["eval_adapter"]
    seeds = guard.get("seeds") or adapter_eval.seeds  # until_decided may have added seeds
    # the adapters' result folders as the stage wrote them: a run evaluated by an older pairloop keeps the labels of
    # its time (adapter_label's hash has changed once), and its report is rebuilt from what is there
    written = guard.get("outputs") or []
    if len(written) != len(adapters):
        raise ValueError(f"loop state: eval_adapter recorded {len(written)} result folder(s) for {len(adapters)} "
                           f"adapter(s): {written}; delete {c.loop.out}/loop_state.json's eval_adapter entry to rerun it")
    labels = [u.rstrip("/").rsplit("/", 1)[-1] for u in written]
    base_dirs = result_dirs(replace(until_decided_off(adapter_eval), adapters=[], seeds=seeds))["base"]
    dirs = [*base_dirs, *(join_uri(adapter_eval.out, lab, f"seed-{s}") for lab in labels for s in seeds)]
    between = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]  # arm vs arm, beside each vs base
    report = build_report(dirs, warnings=guard.get("warnings", []), leakage=guard.get("leakage", []),
                          between=between)
    add_serving(report, guard.get("hot_load", []), guard.get("serving"))
    if guard.get("until_decided"):
        add_until_decided(report, guard["until_decided"])
    report_dir = join_uri(c.loop.out, "report")
    write_report(report, report_dir)
    from pairloop import summary

    run_summary, images = summary.build(c.command, log.state, c.gen.out, arms, report)
    summary.write(report_dir, run_summary, images)
    report["run_summary"] = run_summary
    print(render_terminal(report))
    print(f"\npairloop run: done in {(time.perf_counter() - t_all) / 60:.1f} min; report in {report_dir}/report.md")
    return report
