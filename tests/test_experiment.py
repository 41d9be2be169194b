"""`make experiment`'s config (configs/experiment-cpu.yaml) end to end on the tiny coder: one pool, two arms
(balanced vs proportional pairs) trained on equal pair counts, base + both adapters evaluated in one pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "experiment-cpu.yaml"

# The experiment's own file, shrunk to the tiny model and the 6 toy problems; nothing about its design changes.
SHRINK = ["engine.dtype=float32", "run.gen_dtype=float32", "engine.max_model_len=512", "engine.cpu_kv_cache_gib=0.5",
          "gen.n=8", "gen.first_round=4", "gen.round_size=4", "gen.sampling.max_tokens=64",
          "gen.sampling.temperature=1.0", "gen.sampling.top_p=1.0", "gen.execution.workers=1", "gen.progress=false",
          "pairs.num_pairs=8", "pairs.pass_rate_min=0.0", "pairs.pass_rate_max=1.0", "pairs.length_ratio_min=0.1",
          "pairs.length_ratio_max=10.0", "pairs.progress=false",
          # one arm asks for fewer pairs, so equal_pairs must rerun the other arm's selection at that count
          "arms.balanced.pairs.num_pairs=5",
          "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.max_length=256",
          "train.learning_rate=1e-3", "train.lora_r=8", "train.gradient_checkpointing=false",
          "eval.seeds=[0,1]", "eval.sampling.temperature=1.0", "eval.sampling.max_tokens=64",
          "eval.execution.workers=1", "eval.progress=false"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_coder, toy_problems, ray_local):
    from pairloop.cli import main

    out = tmp_path_factory.mktemp("experiment") / "run"
    argv = ["run", "--config", str(CONFIG), f"run.out={out}", f"run.problems={toy_problems}",
            f"engine.model={tiny_coder}", *SHRINK]
    rc = main(argv)
    return rc, out, argv, toy_problems


def test_every_stage_of_both_arms_runs_and_the_report_compares_them(experiment):
    rc, out, _, _ = experiment
    assert rc == 0
    stages = json.loads((out / "loop_state.json").read_text())["stages"]
    assert set(stages) == {"eval_base", "gen", "pairs:balanced", "pairs:proportional", "train:balanced",
                           "train:proportional", "eval_adapter"}
    report = json.loads((out / "report" / "report.json").read_text())
    labels = {v["label"] for v in report["variants"]}
    assert len(labels) == 3 and report["base"] in labels
    pairs_of = {(c["base"], c["adapter"]) for c in report["comparisons"]}
    arm_labels = sorted(labels - {report["base"]})
    assert {(report["base"], a) for a in arm_labels} <= pairs_of  # each adapter vs base
    assert len(pairs_of) == 3  # and the two arms against each other
    (between,) = [c for c in report["comparisons"] if c["base"] != report["base"]]
    assert {between["base"], between["adapter"]} == set(arm_labels)
    assert f"{between['adapter']} vs {between['base']}" in (out / "report" / "report.md").read_text()
    # the report says how the adapters were served and that each one's hot-load check passed
    # (auto: the tiny eval is far below the merged break-even, so the adapters are hot-loaded)
    assert report["adapter_serving"]["adapter_mode"] == "lora"
    assert report["adapter_serving"]["why"].startswith("auto: this eval may generate only")
    checks = {h["sha256"]: h for h in report["hot_load"]}
    assert len(checks) == 2 and all(h["mode"] == "lora" and h["max_abs_diff"] <= h["tolerance"] for h in checks.values())
    assert any(line.startswith("adapters served lora: auto: ") for line in report["status"])
    # one eval pass: a single eval stage served base and both adapters, each with its own results
    for label in arm_labels + ["base"]:
        assert len(list((out / "eval" / label).glob("seed-*/manifest.json"))) == 2, label  # eval.seeds=[0,1]


def test_the_arms_train_on_equal_pair_counts_from_one_pool(experiment):
    import pyarrow.parquet as pq

    from gen.shards import file_sha256

    _, out, _, _ = experiment
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["arms"]["balanced"]["pairs"]["balance"] != cfg["arms"]["proportional"]["pairs"]["balance"]
    counts, pools = {}, {}
    for arm in ("balanced", "proportional"):
        counts[arm] = pq.read_table(out / f"pairs-{arm}" / "pairs.parquet").num_rows
        rep = json.loads((out / f"pairs-{arm}" / "report.json").read_text())
        pools[arm] = [(i["uri"], i["run_id"]) for i in rep["inputs"]]
        manifest = json.loads((out / f"adapter-{arm}" / "train_manifest.json").read_text())
        assert file_sha256(str(out / f"pairs-{arm}" / "pairs.parquet")) in json.dumps(manifest)
    assert counts["balanced"] == counts["proportional"] == 5, counts  # equalized down to the smaller arm
    assert pools["balanced"] == pools["proportional"] and len(pools["balanced"]) == 1
    stages = json.loads((out / "loop_state.json").read_text())["stages"]
    assert "alias" in stages["pairs:proportional"]  # rerun at the equalized count, standing for the one asked
    t = {arm: json.loads((out / f"adapter-{arm}" / "train_manifest.json").read_text())["config"]
         for arm in ("balanced", "proportional")}
    differ = {k for k in t["balanced"] if t["balanced"][k] != t["proportional"][k]}
    assert differ == {"pairs", "out"}, differ  # same hyperparameters and training seed


def test_no_pair_comes_from_a_held_out_problem(experiment):
    import pyarrow.parquet as pq

    from tasks.problems import load_problems, split_problems

    _, out, _, problems = experiment
    _, held_out = split_problems(load_problems(problems), 0.5, 0)
    assert held_out
    for arm in ("balanced", "proportional"):
        t = pq.read_table(out / f"pairs-{arm}" / "pairs.parquet").to_pylist()
        assert t and not {r["problem_id"] for r in t} & {p.id for p in held_out}
        prompts = json.dumps([r["prompt"] for r in t])
        for p in held_out:  # content too: no held-out problem's text is in any pair's prompt
            assert json.dumps(p.prompt.strip())[1:-1] not in prompts, p.id


def test_a_rerun_resumes_without_running_any_stage(experiment, capsys):
    from pairloop.cli import main

    rc, out, argv, _ = experiment
    before = json.loads((out / "loop_state.json").read_text())
    assert main(argv) == 0
    assert "== " not in capsys.readouterr().out
    assert json.loads((out / "loop_state.json").read_text()) == before


@pytest.mark.parametrize("arms, match", [
    ({"only": {"pairs": {"balance": "uniform"}}}, "at least 2 arms"),
    ({"Bad-Name": {}, "b": {}}, "arm name"),
    ({"a": {"gen": {"n": 4}}, "b": {}}, "may set only"),
    ({"a": {"pairs": {"out": "x"}}, "b": {}}, r"arms\.a\.pairs\.out is set by the loop"),
    ({"a": {"pairs": {"balanse": "uniform"}}, "b": {}}, "balanse"),
])
def test_bad_arms_are_refused_before_any_work(arms, match, tmp_path):
    from pairloop.loop import loop_configs

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"run": {"out": str(tmp_path / "r")}, "arms": arms}))
    with pytest.raises(ValueError, match=match):
        loop_configs(["--config", str(path)])


def test_a_rerun_with_the_same_seeds_reproduces_the_digests(experiment, tmp_path):
    """docs/results.md's numbers must reproduce: a second run into a fresh folder gives the same pool, the same
    pairs per arm and the same report numbers (content digests in report/run.json)."""
    from pairloop.cli import main

    _, out, argv, _ = experiment
    first = json.loads((out / "report" / "run.json").read_text())
    second_out = tmp_path / "rerun"
    assert main([a if not a.startswith("run.out=") else f"run.out={second_out}" for a in argv]) == 0
    second = json.loads((second_out / "report" / "run.json").read_text())
    assert first["pool"]["digest"] == second["pool"]["digest"]
    assert {a: v["pairs_digest"] for a, v in first["arms"].items()} == \
        {a: v["pairs_digest"] for a, v in second["arms"].items()}
    assert first["report_digest"] == second["report_digest"]
    md = (out / "report" / "run.md").read_text()
    assert first["pool"]["digest"] in md and "train-balanced.png" in md and (out / "report" / "train-balanced.png").exists()
    assert set(first["stages"]) == set(json.loads((out / "loop_state.json").read_text())["stages"])


# ---- the GPU counterpart: configs/gpu-experiment.yaml, run by bench/gpu_experiment.sh (nothing here needs a GPU)

GPU_CONFIG = ROOT / "configs" / "gpu-experiment.yaml"
GPU_SCRIPTS = [ROOT / "bench" / "gpu_experiment.sh", ROOT / "bench" / "gpu_stage.sh"]
# How the GPU run may differ from the CPU one: where it writes, how much work is in flight, and the numerics its
# engines run (engine.dtype and run.gen_dtype: bf16 throughout on the GPU), not what is drawn.
GPU_ONLY = {"loop": {"out", "gen_dtype"}, "gen": {"out", "inflight_per_engine"}, "eval": {"out", "sequences_per_call"},
            "pairs": {"out", "inputs"}, "train": {"out", "pairs"}}


def test_the_gpu_config_is_the_cpu_experiment_on_a_gpu_engine():
    from gen.shards import config_to_dict
    from pairloop.loop import loop_configs

    gpu = loop_configs(["--config", str(GPU_CONFIG)])
    cpu = loop_configs(["--config", str(CONFIG)])

    def same(a, b, section):
        a, b = config_to_dict(a), config_to_dict(b)
        differ = {k for k in a if a[k] != b[k]} - GPU_ONLY[section]
        assert not differ, {k: (a[k], b[k]) for k in differ}

    for section in ("loop", "gen", "eval"):  # the split, the pool, the held-out problems, seeds and sampling
        same(getattr(gpu, section), getattr(cpu, section), section)
    assert list(gpu.arms) == list(cpu.arms) == ["balanced", "proportional"] and gpu.equal_pairs and cpu.equal_pairs
    for arm in gpu.arms:  # every arm's pairs and DPO settings, training seed included
        same(gpu.arms[arm][0], cpu.arms[arm][0], "pairs")
        same(gpu.arms[arm][1], cpu.arms[arm][1], "train")
    e, ce = gpu.engine, cpu.engine
    assert e.dtype == "bfloat16" and e.enforce_eager and 0 < e.gpu_memory_utilization < 0.9
    assert (e.model, e.max_model_len, e.max_lora_rank) == (ce.model, ce.max_model_len, ce.max_lora_rank)
    assert e.max_num_seqs >= gpu.gen.inflight_per_engine * gpu.gen.problems_per_unit * gpu.gen.round_size


@pytest.mark.parametrize("script", GPU_SCRIPTS, ids=lambda p: p.name)
def test_the_gpu_scripts_are_valid_bash(script):
    import subprocess

    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in script.read_text()


def _dry_gpu_machine(tmp_path, pieces: dict[str, bytes], carried: list[str]):
    """A copy of the script in a scratch project whose .gpu/ carries `carried` of `pieces` (name -> bytes, named
    cN/partNN or mN/model.tar.NN), with a manifest of all of them; the GPU machine's /tmp is tmp_path/t."""
    import hashlib
    import shutil

    (tmp_path / "bench").mkdir()
    for name in ("gpu_experiment.sh", "gpu_preflight.py"):
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    gpu = tmp_path / ".gpu"
    lines = []
    for rel, data in pieces.items():
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {rel}\n")
        if rel in carried:
            (gpu / rel).parent.mkdir(parents=True, exist_ok=True)
            (gpu / rel).write_bytes(data)
    gpu.mkdir(exist_ok=True)
    (gpu / "MANIFEST").write_text("".join(lines))
    st = tmp_path / "t" / "st"
    st.mkdir(parents=True)
    (st / ".preflight-done").touch()  # the preflight needs the GPU machine; it has its own checks on that machine
    return st


def _gpu_script(tmp_path, *args):
    import os
    import subprocess

    env = {**os.environ, "GPU_TMP": str(tmp_path / "t"), "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", "bench/gpu_experiment.sh", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_receive_moves_a_carried_piece_and_counts_what_is_still_to_come(tmp_path):
    st = _dry_gpu_machine(tmp_path, {"c0/part00": b"a" * 1000, "c1/part01": b"b" * 10}, carried=["c0/part00"])
    proc = _gpu_script(tmp_path, "receive")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (st / "part00").read_bytes() == b"a" * 1000 and not (tmp_path / ".gpu" / "c0" / "part00").exists()
    assert "holds 1 of 2 pieces; still to come: part01" in proc.stdout


def test_receive_refuses_a_damaged_piece(tmp_path):
    st = _dry_gpu_machine(tmp_path, {"c0/part00": b"a" * 1000}, carried=["c0/part00"])
    (tmp_path / ".gpu" / "c0" / "part00").write_bytes(b"a" * 999 + b"b")  # one byte changed in transit
    proc = _gpu_script(tmp_path, "receive")
    assert proc.returncode == 1 and "c0/part00: sha256" in proc.stdout, proc.stdout + proc.stderr
    assert not (st / "part00").exists()


def test_run_stops_before_installing_anything_when_a_piece_is_missing(tmp_path):
    _dry_gpu_machine(tmp_path, {"c0/part00": b"a", "m0/model.tar.00": b"m"}, carried=["c0/part00"])
    assert _gpu_script(tmp_path, "receive").returncode == 0
    proc = _gpu_script(tmp_path, "run")
    assert proc.returncode == 1 and "missing in" in proc.stdout and "model.tar.00" in proc.stdout, proc.stdout
    assert not (tmp_path / "t" / "site").exists() and not (tmp_path / "t" / "pkg").exists()
    assert "FAILED (exit 1) in step 'pieces'" in proc.stdout
