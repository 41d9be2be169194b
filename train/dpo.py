"""DPO + LoRA: turn preference pairs into a PEFT adapter that vLLM hot-loads.

    python -m train pairs=runs/demo/pairs out=runs/demo/adapter model=default
    pairloop train --config configs/demo.yaml

This is a thin, configured adapter over TRL's `DPOTrainer` and `peft.LoraConfig`. What it adds:

- the pairs files are checked at the boundary (required columns, not empty, one model);
- the base model must be the model the pairs were sampled from (DPO's reference is that model), compared by weight
  fingerprint: gen's manifest records it, the pairs report carries it, train checks it (`check_pairs_model`);
- the adapter's rank must fit the engines' `max_lora_rank`, checked before anything is loaded;
- the result is one folder, written atomically: `adapter_config.json`, `adapter_model.safetensors`,
  `train_manifest.json` (base model identity, pairs hashes, config, versions, final metrics), `metrics.jsonl`
  (one line per logged step) and `metrics.png`.

The reference model is the base model with the adapter disabled (TRL does this when it gets a `peft_config` and no
`ref_model`), so there is one copy of the weights in memory.

Precision (`precision`, default `auto`): on a CUDA GPU with bf16 (Ampere or later), bf16 weights under bf16
autocast; on a CPU with native bf16 instructions (AMX-BF16 or AVX512_BF16, `gen.hardware`), float32 weights with
the matmuls under bf16 autocast (`torch.autocast("cpu")`, set up by accelerate from TrainingArguments' bf16 +
use_cpu): 2.3x the float32 pairs/s on such a Xeon, losses within 1% of float32's (docs/benchmarks.md, "DPO
training speed"); elsewhere float32 (an AVX2-only CPU emulates bf16: 2.5x slower). LoRA weights stay float32 in
every mode (peft upcasts them). The choice and the reason are printed at start and recorded in the manifest.

Several GPUs: one process per GPU, data parallel (DDP); the effective batch is
`batch_size * grad_accum * number of GPUs`, and only the main process writes the output folder:

    accelerate launch --num_processes 8 -m train --config configs/demo.yaml
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gen.shards import check_output_path, config_to_dict, file_sha256, identity_dict
from train import allocator as malloc

# vLLM accepts only these values for `max_lora_rank` (vllm.config.lora.MaxLoRARanks, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The columns train reads. pairs/ writes more (problem_id, ...): they are provenance, recorded, not trained on.
PAIRS_REQUIRED_COLUMNS = ("prompt", "chosen", "rejected", "model")

MANIFEST_NAME = "train_manifest.json"  # the name eval/run.py reads
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST_SCHEMA = "adapter/v1"

# What `precision` may be: auto picks one of the others for the device (resolve_precision).
#   float32        float32 weights and compute
#   bf16-autocast  float32 weights, matmuls/linear layers in bf16 under torch.autocast (optimizer state float32)
#   bf16           bf16 base weights under bf16 autocast (LoRA weights float32); on CPU slower than bf16-autocast
PRECISIONS = ("auto", "float32", "bf16-autocast", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    pairs: tuple[str, ...] = ()  # pairs Parquet files, or folders whose *.parquet are read (pairs/ output)
    out: str = ""  # the adapter folder to create; an existing complete one with the same manifest is reused
    model: str = "default"  # hub id, local folder, or an alias gen.model_source knows ("default")
    # Train even if the pairs were sampled from another model (off-policy DPO) or from a model their files don't
    # record (no pairs report); the manifest's pairs.provenance says which.
    allow_model_mismatch: bool = False

    # LoRA. vLLM serves adapters up to the engines' max_lora_rank (its default is 16); r=16 fits it.
    lora_r: int = 16
    lora_alpha: int = 32  # scale alpha/r = 2, the common LoRA setting; vLLM applies the same scale
    lora_dropout: float = 0.0  # TRL turns dropout off so policy and reference see the same network; >0 keeps it on
    target_modules: tuple[str, ...] = ("all-linear",)  # all linear layers but lm_head (vLLM and TRL can't train it)
    max_lora_rank: int = 16  # the max_lora_rank gen/eval start vLLM with; lora_r above it can't be served

    # DPO. Conservative on purpose: the data are a few hundred self-generated pairs.
    beta: float = 0.1  # KL strength to the base model; 0.1 is the DPO paper's value (higher = stay closer)
    learning_rate: float = 5e-6  # as the alignment-handbook's LoRA DPO recipe (zephyr-7b-dpo-qlora); full FT ~5e-7
    num_train_epochs: float = 1.0  # one pass: repeated pairs are memorised fast (train reward accuracy -> 1)
    max_steps: int = -1  # >0 overrides epochs (benchmarks, smoke runs)
    batch_size: int = 2  # pairs per device per forward (each pair = 2 sequences)
    grad_accum: int = 8  # -> 16 pairs per optimizer step on one device
    max_length: int = 1024  # prompt+completion tokens; a HumanEval/MBPP prompt + a solution mostly fit in 1024
    warmup_ratio: float = 0.1  # fraction of steps with linear LR warmup
    lr_scheduler: str = "cosine"  # transformers scheduler name
    # One reference pass over all pairs up front instead of a no-grad forward per step: pays off only at >1 epoch
    # (0.5B on CPU: 136 vs 177 s/step, but a 95 s pass for 8 pairs; docs/benchmarks.md).
    precompute_ref_log_probs: bool = False
    # Recompute activations in backward: 0.5B on CPU at 256 tokens, no measurable slowdown and 2.5 GiB less RSS
    # (docs/benchmarks.md); TRL quotes ~20% slower on GPU, the price of fitting longer sequences and larger models.
    gradient_checkpointing: bool = True
    logging_steps: int = 1  # optimizer steps between lines of metrics.jsonl
    seed: int = 0
    # auto: bf16 on a bf16 GPU; bf16-autocast on a CPU with AMX-BF16/AVX512_BF16 (2.3x float32's pairs/s there);
    # float32 on other CPUs (bf16 emulated: 2.5x slower). One of PRECISIONS.
    precision: str = "auto"
    # The training process's malloc (train/allocator.py): jemalloc = a child process under jemalloc, decay off
    # (1.5-1.7x glibc's pairs/s on the AMX Xeons, but RSS grew to 21 GB over 16 steps); auto = the process's own.
    # How training runs, not what it computes: recorded in the manifest, not part of the adapter's identity.
    allocator: str = field(default="auto", metadata={"identity": False})

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("TrainConfig.pairs: give at least one pairs Parquet file or folder, got ()")
        if not self.out:
            raise ValueError("TrainConfig.out: give the adapter folder to create, got ''")
        check_output_path("train.out", self.out)  # a relative out inside a `ray job` working-dir copy is lost
        if not self.model:
            raise ValueError("TrainConfig.model: give a hub id, a local folder or 'default', got ''")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"TrainConfig.max_lora_rank={self.max_lora_rank}: vLLM accepts only {list(VLLM_LORA_RANKS)}"
            )
        if self.lora_r < 1:
            raise ValueError(f"TrainConfig.lora_r={self.lora_r}: must be >= 1")
        if self.lora_r > self.max_lora_rank:
            raise ValueError(
                f"TrainConfig.lora_r={self.lora_r} exceeds max_lora_rank={self.max_lora_rank}, the largest adapter "
                f"rank the vLLM engines of gen/eval are started with: they would refuse this adapter. Lower lora_r, "
                f"or raise max_lora_rank here and in the gen and eval configs alike"
            )
        if self.lora_alpha <= 0:
            raise ValueError(f"TrainConfig.lora_alpha={self.lora_alpha}: must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("TrainConfig.target_modules: empty; use ('all-linear',) or module names")
        if "lm_head" in self.target_modules:
            raise ValueError(f"TrainConfig.target_modules={self.target_modules}: lm_head can't carry a LoRA here")
        if self.beta <= 0:
            raise ValueError(f"TrainConfig.beta={self.beta}: must be > 0")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"TrainConfig.learning_rate={self.learning_rate}: must be in (0, 1)")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError(f"TrainConfig.num_train_epochs={self.num_train_epochs}: must be > 0 (or set max_steps)")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.max_length < 16:
            raise ValueError(f"TrainConfig.max_length={self.max_length}: must be >= 16 tokens")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: must be one of {list(PRECISIONS)}")
        if self.allocator not in malloc.ALLOCATORS:
            raise ValueError(f"TrainConfig.allocator={self.allocator!r}: must be one of {list(malloc.ALLOCATORS)}")


def training_precision(cfg: TrainConfig) -> tuple[str, str]:
    """(precision, why) of a training with `cfg` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve_precision(cfg.precision, cuda, cuda and torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, cuda: bool, cuda_bf16: bool) -> tuple[str, str]:
    """(precision, why) training runs in: the configured one, or what `auto` picks for this device."""
    if precision != "auto":
        return precision, "set by train.precision"
    if cuda:
        if cuda_bf16:
            return "bf16", "auto on a CUDA GPU with bf16"
        return "float32", "auto on a CUDA GPU without bf16 (pre-Ampere)"
    from gen.hardware import cpu_dtype

    dtype, why = cpu_dtype()
    return ("bf16-autocast" if dtype == "bfloat16" else "float32"), f"auto on CPU: {why}"


# ---------------------------------------------------------------------------------------------------------------
# Pairs: the input boundary


def pairs_files(specs: tuple[str, ...] | list[str]) -> list[Path]:
    """The Parquet files named by `specs`: files as given, folders as their sorted *.parquet."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise ValueError(f"TrainConfig.pairs: folder {spec!r} holds no *.parquet file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"TrainConfig.pairs: no such file or folder {spec!r}")
    return files


def _is_text(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _is_messages(tp: pa.DataType) -> bool:
    if not (pa.types.is_list(tp) or pa.types.is_large_list(tp)):
        return False
    item = tp.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}


def read_pairs(files: list[Path]) -> pa.Table:
    """All pairs of `files` as one table. Fails naming the file on missing columns, mixed formats, no rows."""
    tables = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"pairs file {str(f)!r} is not readable Parquet: {e}") from None
        missing = [c for c in PAIRS_REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(
                f"pairs file {str(f)!r} lacks required column(s) {missing}; has {schema.names}; "
                f"train needs {list(PAIRS_REQUIRED_COLUMNS)}"
            )
        kinds = {}
        for c in ("prompt", "chosen", "rejected"):
            tp = schema.field(c).type
            kinds[c] = "text" if _is_text(tp) else "messages" if _is_messages(tp) else str(tp)
        if len(set(kinds.values())) != 1 or next(iter(kinds.values())) not in ("text", "messages"):
            raise ValueError(
                f"pairs file {str(f)!r}: prompt/chosen/rejected must all be strings or all be lists of "
                f"{{role, content}} messages, got {kinds}"
            )
        tables.append(pq.read_table(f))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise ValueError(f"pairs: no rows in {[str(f) for f in files]}; nothing to train on")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Base model: where it is, what it is, and whether it is the model the pairs came from


def base_model(spec: str) -> tuple[str, dict[str, Any]]:
    """(what transformers loads, identity) of the base model: a folder for built-ins, local folders and cached hub
    ids, else the hub id. The identity (name, kind, path, fingerprint, ...) is gen.model_source's, the same one gen
    records in sample rows and eval checks adapters against."""
    from gen.model_source import model_identity, resolve_model

    load = resolve_model(spec)
    ident = model_identity(spec)
    snapshot = Path(ident["path"])
    ident["hub_commit"] = (
        snapshot.name if _hub_name(snapshot) and re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    )
    return load, ident


def _hub_name(path: Path) -> str | None:
    """'org/name' for a Hugging Face cache snapshot folder (.../models--org--name/snapshots/<commit>)."""
    for part in reversed(path.parts):
        m = re.fullmatch(r"models--(.+)", part)
        if m:
            return m.group(1).replace("--", "/")
    return None


PAIRS_REPORT = "report.json"  # pairs/ writes it beside pairs.parquet: pairs_sha256 + each input run's model identity
_RUN_ID_COLUMNS = ("chosen_run_id", "rejected_run_id")  # which gen runs each pair's two completions came from


def pairs_provenance(files: list[Path], sha256s: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(sources, gaps) for the pairs files: a source is a gen run one of the files' pairs came from, with the model
    name and fingerprint its gen manifest recorded (carried by the pairs report's `inputs`); a gap is a file or
    run whose model identity is not known, with the reason.

    A file's report counts only when its `pairs_sha256` is the file's sha256 (the report describes these bytes).
    """
    sources: list[dict[str, Any]] = []
    gaps: list[str] = []
    for f, sha in zip(files, sha256s):
        report_path = f.parent / PAIRS_REPORT
        try:
            report = json.loads(report_path.read_text())
        except FileNotFoundError:
            gaps.append(f"{str(f)!r}: no {PAIRS_REPORT} beside it (not written by the pairs stage)")
            continue
        except (OSError, ValueError) as e:
            gaps.append(f"{str(f)!r}: {str(report_path)!r} is unreadable ({e})")
            continue
        if not isinstance(report, dict) or report.get("pairs_sha256") != sha:
            recorded = report.get("pairs_sha256") if isinstance(report, dict) else None
            gaps.append(f"{str(f)!r}: {str(report_path)!r} describes another pairs file (its pairs_sha256 is "
                        f"{recorded!r}, the file's is {sha!r})")
            continue
        names = pq.read_schema(f).names
        if not all(c in names for c in _RUN_ID_COLUMNS):
            gaps.append(f"{str(f)!r}: no {list(_RUN_ID_COLUMNS)} columns, so its pairs can't be traced to gen runs")
            continue
        cols = pq.read_table(f, columns=list(_RUN_ID_COLUMNS))
        used = sorted({r for c in _RUN_ID_COLUMNS for r in cols.column(c).to_pylist()}, key=str)
        inputs = [i for i in report.get("inputs") or [] if isinstance(i, dict)]
        for run_id in used:
            runs = [i for i in inputs if i.get("run_id") == run_id]
            if not runs:
                gaps.append(f"{str(f)!r}: run {run_id!r} is not among the inputs of {str(report_path)!r}")
            for run in runs:
                if not run.get("model_fingerprint"):
                    gaps.append(f"{str(f)!r}: run {run_id!r} ({run.get('uri')}) records no model fingerprint")
                else:
                    sources.append({"file": str(f), "run_id": run_id, "uri": run.get("uri"),
                                    "model": run.get("model"), "model_fingerprint": run["model_fingerprint"]})
    return sources, gaps


def check_pairs_model(
    sources: list[dict[str, Any]], gaps: list[str], spec: str, ident: dict[str, Any], allow_mismatch: bool
) -> dict[str, Any]:
    """Fail unless every gen run the pairs came from sampled the base model, compared by weight fingerprint (a
    folder name says nothing: two fine-tunes share one). Unknown provenance fails too. With allow_mismatch, both
    pass with a warning; the returned record (for the train manifest) says what was and was not checked."""
    base_fp = ident.get("fingerprint")
    base = f"TrainConfig.model={spec!r} is {ident.get('name')!r} ({ident.get('path')}, fingerprint {base_fp})"
    foreign = [s for s in sources if s["model_fingerprint"] != base_fp]
    problems = []
    if base_fp is None:
        problems.append(f"{base}: the base model's fingerprint is unknown, so no pairs can be matched to it")
    elif foreign:
        listed = "; ".join(
            f"{s['file']!r} run {s['run_id']!r} sampled {s['model']!r} (fingerprint {s['model_fingerprint']})"
            for s in foreign[:5]
        )
        problems.append(f"pairs were sampled from another model: {listed}{' ...' if len(foreign) > 5 else ''}; but "
                        f"{base}. DPO's reference is the base model, so pairs must come from it")
    if gaps:
        problems.append(f"the model the pairs were sampled from is unknown: {'; '.join(gaps[:5])}"
                        f"{' ...' if len(gaps) > 5 else ''}")
    if problems and not allow_mismatch:
        raise ValueError(". ".join(problems) + ". Train on the matching model and pairs made by `pairloop pairs`, "
                         "or set allow_model_mismatch=true to train off-policy / without provenance on purpose")
    for p in problems:
        print(f"WARNING: allow_model_mismatch=true: {p}", file=sys.stderr)
    return {"checked": not problems, "allowed_mismatch": bool(problems), "problems": problems,
            "fingerprints": sorted({s["model_fingerprint"] for s in sources})}


# ---------------------------------------------------------------------------------------------------------------
# Training


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Appends every log event (loss, rewards/margins, rewards/accuracies, ...) as one JSON line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    return MetricsJsonl()


def _peft_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets: str | list[str] = (
        "all-linear" if tuple(cfg.target_modules) == ("all-linear",) else list(cfg.target_modules)
    )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",  # vLLM serves LoRA A/B only
        task_type="CAUSAL_LM",
    )


def build_trainer(cfg: TrainConfig, pairs: pa.Table, model_path: str | Path, work_dir: Path, callbacks=()):
    """A DPOTrainer for `pairs` on the model in `model_path`, LoRA-wrapped, reference = adapter disabled."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    precision, why = training_precision(cfg)
    print(f"train: precision {precision} ({why})", file=sys.stderr)
    args = DPOConfig(
        output_dir=str(work_dir),
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        gradient_checkpointing=cfg.gradient_checkpointing,
        disable_dropout=cfg.lora_dropout == 0.0,
        bf16=precision != "float32",  # bf16 autocast (accelerate); TRL's default is True even on CPU
        use_cpu=not on_gpu,  # transformers refuses bf16 without a bf16 GPU unless told the device is the CPU
        logging_steps=cfg.logging_steps,
        dataloader_pin_memory=on_gpu,
        save_strategy="no",  # the adapter is saved once, at the end, atomically
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    weights = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights)
    dataset = Dataset(pairs.select(["prompt", "chosen", "rejected"]))
    return DPOTrainer(
        model=model,
        ref_model=None,  # with peft_config: the reference is `model` with the adapter disabled
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg),
        callbacks=list(callbacks),
    )


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss, reward margin, reward accuracy and chosen/rejected rewards per step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    panels = [
        ("loss", ["loss"]),
        ("reward margin (chosen - rejected)", ["rewards/margins"]),
        ("reward accuracy", ["rewards/accuracies"]),
        ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("trl", "peft", "transformers", "torch", "accelerate", "datasets")}


def _identity(cfg: TrainConfig, pairs: list[dict[str, Any]], base: dict[str, Any], precision: str) -> dict[str, Any]:
    """What makes two trainings the same training: config (but where it is written), pairs contents, base weights,
    and the precision it resolves to here (`auto` on another CPU is another training)."""
    config = {k: v for k, v in identity_dict(cfg).items() if k != "out"}
    return {"config": config, "pairs_sha256": [p["sha256"] for p in pairs], "base_fingerprint": base["fingerprint"],
            "precision": precision}


_NOT_IDENTITY = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("identity", True))


def _manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": {k: v for k, v in manifest.get("config", {}).items() if k not in ("out", *_NOT_IDENTITY)},
        "pairs_sha256": [p.get("sha256") for p in manifest.get("pairs", {}).get("files", [])],
        "base_fingerprint": manifest.get("base_model", {}).get("fingerprint"),
        "precision": manifest.get("precision"),
    }


def _existing_output(out: Path, identity: dict[str, Any]) -> bool:
    """True if `out` is a complete adapter of this very training; error if it is anything else."""
    if not out.exists():
        return False
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(f"TrainConfig.out={str(out)!r} exists and has no {MANIFEST_NAME}; choose another folder")
    old = _manifest_identity(json.loads(manifest.read_text()))
    if old != identity:
        diffs = [
            f"{k}: {old['config'].get(k)!r} (existing) vs {v!r} (now)"
            for k, v in identity["config"].items()
            if old["config"].get(k) != v
        ]
        if old["pairs_sha256"] != identity["pairs_sha256"]:
            diffs.append("pairs files' contents")
        if old["base_fingerprint"] != identity["base_fingerprint"]:
            diffs.append("base model weights")
        if old["precision"] != identity["precision"]:
            diffs.append(f"precision: {old['precision']!r} (existing) vs {identity['precision']!r} (now)")
        raise ValueError(
            f"TrainConfig.out={str(out)!r} holds an adapter from a different training ({'; '.join(diffs)}); "
            "choose another folder or delete it"
        )
    missing = [f for f in ADAPTER_FILES if not (out / f).is_file()]
    if missing:
        raise ValueError(f"TrainConfig.out={str(out)!r}: manifest present but {missing} missing; delete the folder")
    return True


def train(cfg: TrainConfig) -> Path:
    """Train (or reuse) the adapter described by `cfg`; returns the adapter folder."""
    files = pairs_files(cfg.pairs)
    table = read_pairs(files)
    model_path, base = base_model(cfg.model)
    pair_models = table.column("model").unique().to_pylist()
    if None in pair_models:
        raise ValueError(f"pairs: column 'model' has nulls in {[str(f) for f in files]}")
    pairs_info = [
        {"path": str(f.resolve()), "sha256": file_sha256(f), "rows": pq.read_metadata(f).num_rows} for f in files
    ]
    sources, gaps = pairs_provenance(files, [p["sha256"] for p in pairs_info])
    if base["fingerprint"] is not None:  # else (a hub id not in the local cache yet) checked once it is loaded
        provenance = check_pairs_model(sources, gaps, cfg.model, base, cfg.allow_model_mismatch)
    precision, why = training_precision(cfg)
    identity = _identity(cfg, pairs_info, base, precision)
    out = Path(cfg.out).expanduser().resolve()
    if _existing_output(out, identity):
        print(f"train: {out} already holds this adapter (same config, pairs and base model); skipping")
        return out
    import torch

    alloc = malloc.resolve(cfg.allocator, torch.cuda.is_available())
    print(f"train: malloc {alloc.name} ({alloc.why})")
    if alloc.child:
        return _train_in_child(cfg, alloc, out)

    from accelerate import PartialState

    main_process = PartialState().is_main_process
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if main_process:
            tmp.mkdir()
        metrics = tmp / METRICS_NAME
        trainer = build_trainer(cfg, table, model_path, tmp / "trainer", callbacks=[_metrics_callback(metrics)])
        kept = len(trainer.train_dataset)  # TRL drops pairs whose prompt alone fills max_length
        if kept == 0:
            raise ValueError(
                f"TrainConfig.max_length={cfg.max_length}: every one of the {table.num_rows} pairs has a prompt of at "
                "least max_length tokens, so no completion token is left to train on; raise max_length"
            )
        if kept < table.num_rows:
            print(f"train: {table.num_rows - kept} of {table.num_rows} pairs dropped: prompt >= max_length tokens")
        if base["fingerprint"] is None:  # a hub id that was not in the local cache before loading it
            _, base = base_model(cfg.model)
            provenance = check_pairs_model(sources, gaps, cfg.model, base, cfg.allow_model_mismatch)
        t0 = time.time()
        result = trainer.train()
        if alloc.name == "jemalloc":  # decay off was for the steps; the probe below would keep its peak resident
            alloc = replace(alloc, released=malloc.release_retained())
        if not main_process:
            return out
        trainer.model.save_pretrained(tmp)
        from gen.probe import PROBE_PAIRS, reference

        # the hot-load check's reference: PEFT's probe log-probs of these very weights (eval compares the engines')
        # without accelerate's autocast wrapper: the probe is these weights' own log-probs, not bf16 matmuls'
        # on the fixed probe text and on the texts of the first training pairs (what the adapter moves most)
        probe = reference(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False),
                          trainer.processing_class,
                          table.slice(0, PROBE_PAIRS).select(["prompt", "chosen", "rejected"]).to_pylist())
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template; the manifest says what this is
        plot_metrics(metrics, tmp / PLOT_NAME)
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        last_step = next((r for r in reversed(logged) if "loss" in r), {})
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "base_model": {"spec": cfg.model, **base},
            "pairs": {
                "files": pairs_info,
                "rows": table.num_rows,
                "trained": kept,
                "models": sorted(pair_models),
                "provenance": provenance,  # the gen runs' model fingerprints, and whether they matched the base
                "adapters": (  # samples drawn from base + an earlier adapter (a later loop round)
                    sorted({a for a in table.column("adapter").to_pylist() if a})
                    if "adapter" in table.column_names else []
                ),
                "problems": (
                    len(set(table.column("problem_id").to_pylist())) if "problem_id" in table.column_names else None
                ),
            },
            "config": config_to_dict(cfg),
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "max_lora_rank": cfg.max_lora_rank},
            "versions": _versions(),
            "adapter_sha256": file_sha256(tmp / "adapter_model.safetensors"),  # eval: a fresh LoRA name per adapter
            "probe": probe,
            "device": trainer.args.device.type,
            "precision": precision,  # resolved, never "auto"
            "precision_why": why,
            "allocator": alloc.record(),  # how it ran (train/allocator.py), not part of the identity
            "world_size": trainer.args.world_size,
            "metrics": {
                **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                "global_step": result.global_step,
                "last_step": last_step,
                "wall_s": round(time.time() - t0, 2),
                # the training process's peak resident memory (in process: the driver's peak so far included)
                "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2),
            },
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _train_in_child(cfg: TrainConfig, alloc: malloc.Plan, out: Path) -> Path:
    """Run `train(cfg)` in a child process started under `alloc`'s malloc (LD_PRELOAD); its output and progress go
    to this process's terminal. A bad-input error in the child is raised here as the same ValueError."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pairloop-train-") as work:
        spec, error = Path(work) / "config.json", Path(work) / "error.txt"
        spec.write_text(json.dumps({"config": config_to_dict(cfg), "error_file": str(error)}))
        code = f"import sys; from train.dpo import child_main; sys.exit(child_main({str(spec)!r}))"
        child = subprocess.Popen([sys.executable, "-c", code], env=malloc.child_env(alloc),
                                 preexec_fn=malloc.die_with_parent)
        try:
            rc = child.wait()
        except BaseException:  # Ctrl-C reached the child too: let it remove its temp folder, then make sure
            try:
                rc = child.wait(timeout=60)
            except BaseException:
                child.kill()
                child.wait()
            raise
        if rc == 2 and error.is_file():
            raise ValueError(error.read_text())
        if rc != 0:
            raise RuntimeError(f"train: the training process (malloc {alloc.name}, {alloc.lib}) exited with {rc}; "
                               "its output is above")
    manifest = out / MANIFEST_NAME
    ran = json.loads(manifest.read_text()).get("allocator", {}) if manifest.is_file() else {}
    if ran.get("name") != alloc.name:  # fail closed: the child must have written this adapter, under this malloc
        raise RuntimeError(f"train: the training process exited 0 but {manifest} records allocator {ran or None}, "
                           f"not {alloc.name}")
    return out


def child_main(spec_path: str) -> int:
    """Entry point of the training child (`_train_in_child`): the config as JSON; exit 2 on bad input."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    try:
        train(cfg)
    except ValueError as e:
        Path(spec["error_file"]).write_text(str(e))
        return 2
    return 0
