"""`pairloop run` end to end on the tiny coder: every stage, a report, and a rerun that skips everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def _config(tmp_path: Path, model: str, problems: str) -> Path:
    cfg = {
        "run": {"out": str(tmp_path / "run"), "problems": problems, "eval_fraction": 0.5, "split_seed": 0},
        "engine": {"model": model, "dtype": "float32", "max_model_len": 512, "cpu_kv_cache_gib": 0.5, "max_lora_rank": 16},
        "gen": {"n": 8, "sampling": {"max_tokens": 64, "temperature": 1.0, "top_p": 1.0},
                "execution": {"workers": 1}, "progress": False},
        "pairs": {"num_pairs": 8, "max_pairs_per_problem": 4, "pass_rate_min": 0.0, "pass_rate_max": 1.0,
                  "length_ratio_min": 0.1, "length_ratio_max": 10.0, "progress": False},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 256, "learning_rate": 1e-3,
                  "lora_r": 8, "gradient_checkpointing": False},
        "eval": {"seeds": [0, 1], "k": 2, "sampling": {"temperature": 1.0, "max_tokens": 64}, "execution": {"workers": 1},
                 "progress": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, tiny_coder, toy_problems, ray_local):
    from pairloop.cli import main

    tmp = tmp_path_factory.mktemp("loop")
    cfg = _config(tmp, tiny_coder, toy_problems)
    rc = main(["run", "--config", str(cfg)])
    return rc, tmp / "run", cfg


def test_loop_runs_every_stage_and_writes_a_report(loop_run):
    rc, out, _ = loop_run
    assert rc == 0
    state = json.loads((out / "loop_state.json").read_text())["stages"]
    assert set(state) == {"eval_base", "gen", "pairs", "train", "eval_adapter"}
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["variants"]) == 2
    (comparison,) = report["comparisons"]
    assert comparison["problems"] == 3  # the held-out split of the 6 toy problems (split_seed 0)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    check_report_against_results(report, (out / "report" / "report.md").read_text())


def check_report_against_results(report: dict, markdown: str) -> None:
    """report.json's numbers, recomputed from the result shards it names, and a verdict that follows from them."""
    import math
    from collections import defaultdict

    from gen.shards import ShardStore

    # (model, adapter) -> seed -> problem -> [passes, scored]; INFRA_ERROR is neither
    counts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0, 0])))
    for source in report["inputs"]:
        table = ShardStore(source["source"]).read_table(columns=["model", "adapter", "run_seed", "problem_id",
                                                                 "outcome"])
        for r in table.to_pylist():
            if r["outcome"] != "INFRA_ERROR":
                cell = counts[(r["model"], r["adapter"])][r["run_seed"]][r["problem_id"]]
                cell[0] += r["outcome"] == "PASS"
                cell[1] += 1
    variants = {v["label"]: v for v in report["variants"]}
    assert len(counts) == len(variants), (sorted(counts, key=str), sorted(variants))
    for v in variants.values():
        by_seed = counts[(v["model"], v["adapter"])]
        want = {str(s): sum(c / n for c, n in probs.values()) / len(probs) for s, probs in by_seed.items()}
        assert v["pass_at_1"]["per_seed"] == pytest.approx(want, abs=1e-12), (v["label"], want)

    (c,) = report["comparisons"]
    base, adapter = counts[(variants[c["base"]]["model"], variants[c["base"]]["adapter"])], \
        counts[(variants[c["adapter"]]["model"], variants[c["adapter"]]["adapter"])]

    def per_problem(side: dict) -> dict:  # mean over seeds of c/n
        problems = {p for probs in side.values() for p in probs}
        return {p: sum(side[s][p][0] / side[s][p][1] for s in side) / len(side) for p in problems}

    b, a = per_problem(base), per_problem(adapter)
    assert set(b) == set(a) and len(b) == c["problems"]
    diffs = [a[p] - b[p] for p in sorted(b)]
    assert c["base_pass_at_1"] == pytest.approx(sum(b.values()) / len(b), abs=1e-12)
    assert c["adapter_pass_at_1"] == pytest.approx(sum(a.values()) / len(a), abs=1e-12)
    assert c["delta"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    gained, lost = sum(d > 1e-12 for d in diffs), sum(d < -1e-12 for d in diffs)
    assert (c["gained"], c["lost"]) == (gained, lost)
    n = gained + lost  # exact two-sided sign test, by hand
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n) if n else 1.0
    assert c["p_value"] == pytest.approx(p, abs=1e-12)

    lo, hi = c["ci"]
    beyond = (lo > 0 or hi < 0) and c["p_value"] < c["alpha"]
    verdict, other = ("beyond noise", "within noise") if beyond else ("within noise", "beyond noise")
    assert c["verdict"] == verdict, (c["verdict"], c["ci"], c["p_value"])
    assert c["sentence"].split(": ")[-1].startswith(verdict) and f"[{lo:+.4f}, {hi:+.4f}]" in c["sentence"]
    assert f"**{c['sentence']}**" in markdown
    assert other not in markdown, f"report.md says {other!r} but the numbers say {verdict!r}"


def test_pairs_never_use_eval_problems(loop_run):
    import pyarrow.parquet as pq

    from tasks.problems import load_problems, split_problems

    _, out, cfg = loop_run
    problems = yaml.safe_load(cfg.read_text())["run"]["problems"]
    _, held_out = split_problems(load_problems(problems), 0.5, 0)
    pairs = pq.read_table(out / "pairs" / "pairs.parquet")
    assert pairs.num_rows > 0
    assert not set(pairs.column("problem_id").to_pylist()) & {p.id for p in held_out}


def test_rerun_skips_completed_stages(loop_run, capsys):
    from pairloop.cli import main

    _, out, cfg = loop_run
    adapter = out / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    state_before = json.loads((out / "loop_state.json").read_text())
    assert main(["run", "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "== " not in printed  # no stage ran again
    assert adapter.stat().st_mtime_ns == before
    assert json.loads((out / "loop_state.json").read_text()) == state_before


def test_a_run_evaluated_under_older_adapter_labels_rebuilds_its_report_from_the_folders_it_wrote(loop_run, capsys):
    """adapter_label's hash changed once (the config is hashed in canonical form): resuming a finished run made
    before must read the adapter's results where its eval wrote them, not look for today's label and fail."""
    from pairloop.cli import main

    _, out, cfg = loop_run
    state_path = out / "loop_state.json"
    state = json.loads(state_path.read_text())
    (written,) = state["stages"]["eval_adapter"]["outputs"]
    now = Path(written)
    old = now.with_name("adapter-0ld1abe1")
    now.rename(old)
    saved = state_path.read_text()
    state["stages"]["eval_adapter"]["outputs"] = [str(old)]
    state_path.write_text(json.dumps(state))
    try:
        assert main(["run", "--config", str(cfg)]) == 0
        assert "== " not in capsys.readouterr().out  # nothing reran
        report = json.loads((out / "report" / "report.json").read_text())
        # read from the renamed folder (the variant's label is the one its results carry)
        assert now.name in {v["label"] for v in report["variants"]} and not now.exists()
        # a state file whose record lost its folders is refused with a clear error (exit 2), not a traceback
        state["stages"]["eval_adapter"]["outputs"] = []
        state_path.write_text(json.dumps(state))
        assert main(["run", "--config", str(cfg)]) == 2
        assert "eval_adapter recorded 0 result folder(s) for 1 adapter(s)" in capsys.readouterr().err
    finally:
        old.rename(now)
        state_path.write_text(saved)
    assert main(["run", "--config", str(cfg)]) == 0


def test_unsectioned_override_is_refused(tmp_path, tiny_coder, toy_problems):
    from pairloop.cli import main

    cfg = _config(tmp_path, tiny_coder, toy_problems)
    assert main(["run", "--config", str(cfg), "n=4"]) == 2


def test_changing_a_gen_setting_reruns_gen_and_every_stage_after_it(loop_run, capsys):
    """Resume must never reuse a stage whose inputs changed: a new gen config -> new pool -> new pairs -> new
    adapter -> its eval; the base eval (which reads none of them) is kept."""
    from pairloop.cli import main

    _, out, cfg = loop_run
    before = json.loads((out / "loop_state.json").read_text())["stages"]
    old_manifest = (out / "gen" / "manifest.json").read_text()
    assert main(["run", "--config", str(cfg), "gen.seed=1"]) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "loop_state.json").read_text())["stages"]
    for stage in ("gen", "pairs", "train", "eval_adapter"):
        assert after[stage]["identity"] != before[stage]["identity"], stage
    assert after["eval_base"] == before["eval_base"]
    assert "== 1/5" not in printed and "== 2/5" in printed and "== 5/5" in printed
    assert json.loads((out / "gen" / "manifest.json").read_text())["identity"]["seed"] == 1
    # the old pool was moved aside, not mixed in or deleted
    superseded = list((out / "superseded").glob("gen-*/gen/manifest.json"))
    assert [p.read_text() for p in superseded] == [old_manifest]
    # and the rerun now skips everything, as before
    assert main(["run", "--config", str(cfg), "gen.seed=1"]) == 0
    assert "== " not in capsys.readouterr().out


def test_until_decided_in_the_loop_reruns_only_the_adapter_eval_and_reports_every_seed_it_added(loop_run, capsys):
    from pairloop.cli import main

    _, out, cfg = loop_run
    args = ["run", "--config", str(cfg), "gen.seed=1"]  # the state the test before this one left
    assert main(args) == 0
    before = json.loads((out / "loop_state.json").read_text())["stages"]
    capsys.readouterr()
    assert main(args + ["eval.until_decided=true", "eval.round_seeds=1", "eval.max_seeds=4"]) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "loop_state.json").read_text())["stages"]
    assert after["eval_base"] == before["eval_base"]  # the base eval's identity ignores until_decided
    assert after["eval_adapter"]["identity"] != before["eval_adapter"]["identity"]
    assert "== 5/5" in printed and "== 4/5" not in printed
    seeds = after["eval_adapter"]["seeds"]
    assert seeds[:2] == [0, 1] and seeds == list(range(len(seeds))) and 2 <= len(seeds) <= 4
    report = json.loads((out / "report" / "report.json").read_text())
    rec = report["until_decided"]
    assert rec["seeds_used"] == len(seeds) and len(rec["looks"]) == len(seeds) - 1
    (comparison,) = report["comparisons"]
    assert comparison["seeds"] == seeds  # the report reads every seed the eval added, for both variants
    assert report["status"][0].startswith("until_decided: ")
    md = (out / "report" / "report.md").read_text().splitlines()
    assert next(line for line in md if line.startswith("- ")).startswith("- until_decided: ")


def test_gen_dtype_runs_the_pool_on_its_own_engines_and_leaves_the_evaluations_alone(loop_run, capsys):
    """run.gen_dtype: the pool in another dtype than the evaluations. Gen reruns (its engines' numerics are part of
    its identity), on engines of that dtype; the base eval is kept and the adapter's eval runs on the eval dtype's
    engines; the summary says which dtype made the pool."""
    from pairloop.cli import main

    _, out, cfg = loop_run
    before = json.loads((out / "loop_state.json").read_text())["stages"]
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "run.gen_dtype=bfloat16"]) == 0
    printed = capsys.readouterr().out
    after = json.loads((out / "loop_state.json").read_text())["stages"]
    assert after["eval_base"] == before["eval_base"]
    assert after["gen"]["identity"] != before["gen"]["identity"]
    assert "== 1/5 gen (train split, engines bfloat16)" in printed and "base eval" not in printed
    # one set of engines per dtype, gen's first, shut down before the evaluations' start
    assert printed.count("gen engine(s) up") == 1 and printed.count("eval engine(s) up") == 1
    assert printed.index("gen engine(s) up") < printed.index("eval engine(s) up")
    gen_manifest = json.loads((out / "gen" / "manifest.json").read_text())
    assert gen_manifest["identity"]["engine"]["dtype"] == "bfloat16"
    assert gen_manifest["summary"]["engine_dtype"]["dtype"] == "bfloat16"
    eval_dtypes = {json.loads(m.read_text())["identity"]["engine"]["dtype"]
                   for m in (out / "eval").glob("*/seed-*/manifest.json")}
    assert eval_dtypes == {"float32"}
    assert "- engine dtype: bfloat16" in (out / "report" / "run.md").read_text()
    report = json.loads((out / "report" / "report.json").read_text())
    assert not any("bfloat16" in line for line in report["status"])  # every evaluation stayed float32


def test_gen_dtype_is_checked(tmp_path, tiny_coder, toy_problems, capsys):
    from pairloop.cli import main

    cfg = _config(tmp_path, tiny_coder, toy_problems)
    assert main(["run", "--config", str(cfg), "run.gen_dtype=bf16"]) == 2
    assert "run.gen_dtype" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
