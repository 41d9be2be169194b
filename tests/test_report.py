"""eval/report.py: a report rebuilt from saved results folders and Parquet files carries the right numbers."""

from __future__ import annotations

import json
import os

import matplotlib.image
import pyarrow.parquet as pq
import pytest

from eval import report
from gen.shards import ShardStore, rows_to_table
from pairloop.cli import main as cli

NO_PHASE = {"PASS", "NO_CODE", "INFRA_ERROR"}


def results(spec: dict[int, dict[str, list[str]]], model: str = "m", adapter: str | None = None) -> list[dict]:
    """Rows for one variant: spec[run_seed][problem_id] = outcomes of samples 0..k-1 (failures in the test phase)."""
    rows = []
    for seed, problems in spec.items():
        for pid, outcomes in problems.items():
            for i, o in enumerate(outcomes):
                rows.append(dict(
                    run_id=f"eval-{adapter or 'base'}", unit_id=f"{seed}-{pid}", problem_id=pid, sample_index=i,
                    run_seed=seed, seed=seed * 1000 + i, model=model, adapter=adapter, prompt="p", completion="c",
                    completion_tokens=1, finish_reason="stop", cumulative_logprob=None, outcome=o,
                    phase=None if o in NO_PHASE else "test", error_type=None, error_message=None, exec_time_s=0.0,
                ))
    return rows


def save_run(folder, rows, complete=True) -> str:
    """A results folder as eval writes it: one unit per seed, manifest last."""
    store = ShardStore(str(folder))
    m = store.open_run(rows[0]["run_id"], {"test": str(folder)})
    for seed in sorted({r["run_seed"] for r in rows}):
        store.write_unit(m, f"seed-{seed}", rows_to_table([r for r in rows if r["run_seed"] == seed]))
    m.complete = complete
    store.write_manifest(m)
    return str(folder)


# 10 problems, k=1. Seeds 1 and 2: base passes p0 only (NAME_ERROR on p1-p5, TYPE_ERROR on p6-p9); the adapter
# passes p1-p8 and fails p0 (SYNTAX_ERROR) and p9 (TYPE_ERROR). Seed 2 differs only in that both also pass p9.
BASE = {1: {f"p{i}": ["PASS" if i == 0 else "NAME_ERROR" if i <= 5 else "TYPE_ERROR"] for i in range(10)},
        2: {f"p{i}": ["PASS" if i in (0, 9) else "NAME_ERROR" if i <= 5 else "TYPE_ERROR"] for i in range(10)}}
ADAPTER = {s: {f"p{i}": ["SYNTAX_ERROR" if i == 0 else "TYPE_ERROR" if i == 9 and s == 1 else "PASS"] for i in range(10)}
           for s in (1, 2)}


@pytest.fixture
def runs(tmp_path):
    base = save_run(tmp_path / "eval" / "base", results(BASE))
    adapter = tmp_path / "eval" / "lora.parquet"
    pq.write_table(rows_to_table(results(ADAPTER, adapter="lora-1")), adapter)
    return base, str(adapter)


def test_report_numbers_from_folder_and_parquet(runs):
    r = report.build_report(runs)
    base, lora = r["variants"]
    assert (base["label"], lora["label"], r["base"]) == ("m", "lora-1", "m")
    assert base["pass_at_1"]["per_seed"] == {"1": 0.1, "2": 0.2}
    assert lora["pass_at_1"]["mean"] == pytest.approx(0.85)
    assert lora["pass_at_1"]["std"] == pytest.approx(0.05 * 2**0.5)  # seeds .8 and .9
    assert base["failures"]["TYPE_ERROR"]["mean"] == pytest.approx(3.5)  # 4 and 3
    (c,) = r["comparisons"]
    # per problem (mean over 2 seeds): p0 -1, p1..p8 +1, p9 .5 on both sides; delta = (8 - 1) / 10
    assert c["delta"] == pytest.approx(0.7)
    assert (c["gained"], c["lost"], c["ties"], c["p_value"]) == (8, 1, 1, 0.0390625)  # 2 * (1 + 9) / 2^9
    assert c["decomposition"]["gained"]["by_base_category"] == {"NAME_ERROR": 5, "TYPE_ERROR": 3}


def test_report_files_carry_the_numbers_and_the_verdict(runs, tmp_path):
    paths = report.write_report(report.build_report(runs), tmp_path / "out")
    saved = json.loads(open(paths["json"]).read())
    (c,) = saved["comparisons"]
    assert c["delta"] == pytest.approx(0.7) and c["verdict"] == "beyond noise"
    md = open(paths["md"]).read()
    assert c["sentence"] in md and "beyond noise (an improvement)" in md
    # lora-1's per-problem scores: p0 0, p1..p8 1, p9 .5; squared deviations from .85: .7225 + 8 * .0225 + .1225
    # = 1.025, SE = sqrt(1.025 / 9 / 10) = 0.1067; CI .85 +- 1.959964 * .1067 = [0.641, 1.059]; seeds .8, .9: std .071
    assert "| pass@1 ± SE | 95% CI (normal) | std across seeds |" in md
    assert "| lora-1 | 2 | 10 | 1 | 0.850 ± 0.107 | [0.641, 1.059] | 0.071 |" in md


def test_markdown_splits_categories_by_phase(tmp_path):
    rows = results({0: {"a": ["NAME_ERROR"], "b": ["NAME_ERROR"], "c": ["PASS"]}})
    rows[0]["phase"] = "definition"
    md = report.render_markdown(report.build_report(rows_to_table(rows)))
    assert "| m | definition | 1.00 ± 0.00 |" in md and "| m | test | 1.00 ± 0.00 |" in md


def test_png_is_a_real_image(runs, tmp_path):
    paths = report.write_report(report.build_report(runs), tmp_path / "out")
    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def test_markdown_is_rendered_from_the_json_alone(runs, tmp_path):
    paths = report.write_report(report.build_report(runs), tmp_path / "out")
    assert report.render_markdown(json.loads(open(paths["json"]).read())) == open(paths["md"]).read()


def test_cli_writes_report_next_to_first_input_and_prints_table(runs, capsys):
    assert cli(["report", *runs]) == 0
    out_dir = os.path.join(os.path.dirname(runs[0]), "report")
    assert sorted(os.listdir(out_dir)) == ["report.json", "report.md", "report.png"]  # no temp files left
    printed = capsys.readouterr().out
    assert "0.850 ± 0.107  [0.641, 1.059]   0.071" in printed and "beyond noise" in printed


def test_infra_errors_are_listed_separately(tmp_path):
    base = {0: {"a": ["PASS", "INFRA_ERROR"], "b": ["NAME_ERROR", "NAME_ERROR"]}}
    r = report.build_report(rows_to_table(results(base)))
    assert r["variants"][0]["pass_at_1"]["mean"] == 0.5 and r["variants"][0]["infra"]["samples"] == 1
    assert "INFRA_ERROR" not in r["categories_shown"]
    md = report.render_markdown(r)
    assert "| m | 1 | 0: 1 | 0 |" in md


def test_cli_rejects_results_from_another_problem_set(tmp_path, capsys):
    base = save_run(tmp_path / "base", results({0: {"a": ["PASS"], "b": ["PASS"]}}))
    other = save_run(tmp_path / "other", results({0: {"a": ["PASS"], "c": ["PASS"]}}, adapter="x"))
    assert cli(["report", base, other, "--out", str(tmp_path / "out")]) == 2
    assert "different problem set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_the_same_results_twice(runs, tmp_path, capsys):
    assert cli(["report", runs[0], runs[0], "--out", str(tmp_path / "out")]) == 2
    assert "more than once" in capsys.readouterr().err


def test_cli_rejects_a_folder_that_is_not_results(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert cli(["report", str(tmp_path / "junk")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_base_option_compares_against_another_adapter(runs, tmp_path):
    v2 = save_run(tmp_path / "v2", results(ADAPTER, adapter="lora-2"))
    r = report.build_report([*runs, v2], base="lora-1")
    assert r["base"] == "lora-1"
    assert [(c["adapter"], c["delta"]) for c in r["comparisons"]] == [("m", pytest.approx(-0.7)), ("lora-2", 0.0)]


def test_incomplete_run_is_flagged(tmp_path):
    folder = save_run(tmp_path / "partial", results({0: {"a": ["PASS"]}}), complete=False)
    assert "INCOMPLETE" in report.render_markdown(report.build_report(folder))


def test_config_rejects_bad_bootstrap_settings():
    with pytest.raises(ValueError, match="bootstrap_samples must be >= 100, got 5"):
        report.ReportConfig(bootstrap_samples=5)
    with pytest.raises(ValueError, match="ci_level"):
        report.ReportConfig(ci_level=1.5)


def test_identical_seeds_report_the_se_over_problems(tmp_path):
    # the demo's "0.750 ± 0.000": 24 problems, 18 passed on each of 3 identical seeds.
    # SE = sqrt((18 * .25^2 + 6 * .75^2) / 23 / 24) = sqrt(4.5 / 552) = 0.0903; std across seeds 0
    spec = {s: {f"p{i:02d}": ["PASS" if i < 18 else "NAME_ERROR"] for i in range(24)} for s in range(3)}
    md = report.render_markdown(report.build_report(rows_to_table(results(spec))))
    assert "| m (base) | 3 | 24 | 1 | 0.750 ± 0.090 | [0.573, 0.927] | 0.000 |" in md


def test_report_keeps_old_comparison_keys_and_adds_the_new_ones(runs):
    (c,) = report.build_report(runs)["comparisons"]
    old = {"delta", "ci", "ci_level", "gained", "lost", "ties", "test", "p_value", "verdict", "sentence", "decomposition"}
    new = {"se", "ci_normal", "correlation", "noise", "mde", "power", "permutation", "sign_test_p_value",
           "secondary_test"}
    assert old | new <= set(c)
    # d = (-1, +1 x8, 0): delta .7, squared deviations 2.89 + 8 * .09 + .49 = 4.1, paired SE = sqrt(4.1 / 90) = .2134
    assert c["se"] == pytest.approx((4.1 / 90) ** 0.5)
    assert c["mde"] == pytest.approx(2.801585 * (4.1 / 90) ** 0.5, abs=1e-6)  # 0.59796


def test_markdown_states_the_mde_and_the_power_table(runs):
    md = report.render_markdown(report.build_report(runs))
    assert "this evaluation could not have detected a change smaller than 59.8 points" in md
    # k=1 x 2 seeds: only p9 varies within (fails seed 1, passes seed 2, on both sides): s^2 = 2/1 * .25 = .5,
    # score variance .5 * (1 + 1) / 2^2 = .25 per side; prediction var = .5 / 10 = .05, SE sqrt(.05 / 10) = .0707.
    # data var = 4.1 / 9 - .05 = .405556, SE = sqrt(.0405556) = .2014. MDE = 2.801585 * .2134 = .5980.
    # problems needed: ceil(7.848879 * .455556 / .49) = ceil(7.297) = 8.
    # samples/problem: room = .49 * 10 / 7.848879 - .405556 = .218737; ceil(.1 / .218737) = 1 (2 now).
    assert "| lora-1 | 0.2134 | 0.2014 | 0.0707 | 0.5980 | 8 | 2 | 1 |" in md and "MDE (80% power)" in md
    assert "| lora-1 | 0.1500 | 0.8500 | +0.7000 ± 0.2134 | [+0.2817, +1.1183] |" in md


def _pixels(png: bytes):
    import io

    return matplotlib.image.imread(io.BytesIO(png))


def test_png_error_bars_are_the_cis_not_the_seed_std(runs):
    r = report.build_report(runs)
    png = _pixels(report.render_png(r))
    seed_std = json.loads(json.dumps(r))
    for v in seed_std["variants"]:
        v["pass_at_1"]["std"] = 0.3
        for f in v["failures"].values():
            f["std"] = 2.0
    assert (_pixels(report.render_png(seed_std)) == png).all()  # the seed std draws nothing
    narrow = json.loads(json.dumps(r))
    for v in narrow["variants"]:
        m = v["pass_at_1"]["mean"]
        v["pass_at_1"]["ci"] = [m - 0.01, m + 0.01]
    assert not (_pixels(report.render_png(narrow)) == png).all()  # the pass@1 CI does
    narrow_cats = json.loads(json.dumps(r))
    for v in narrow_cats["variants"]:
        for f in v["failures"].values():
            f["ci"] = None
    assert not (_pixels(report.render_png(narrow_cats)) == png).all()  # and so do the categories' CIs


def test_cli_between_compares_two_adapters_with_each_other(runs, tmp_path, capsys):
    other = tmp_path / "eval" / "lora2.parquet"
    spec = {s: {f"p{i}": ["PASS" if i < 3 else "NAME_ERROR"] for i in range(10)} for s in (1, 2)}
    pq.write_table(rows_to_table(results(spec, adapter="lora-2")), other)
    out = tmp_path / "out"
    assert cli(["report", *runs, str(other), "--out", str(out), "--between", "lora-1:lora-2"]) == 0
    saved = json.loads((out / "report.json").read_text())
    pairs = [(c["base"], c["adapter"]) for c in saved["comparisons"]]
    assert pairs == [("m", "lora-1"), ("m", "lora-2"), ("lora-1", "lora-2")]
    # lora-2 - lora-1 per problem: p0 +1, p1, p2 0, p3..p8 -1, p9 -0.5 (lora-1 passes it in seed 2 only)
    assert saved["comparisons"][2]["delta"] == pytest.approx((1 - 6 - 0.5) / 10)
    # a comparison's power note names both sides: lora-2 vs base and lora-2 vs lora-1 are two notes, not one twice
    for c in saved["comparisons"]:
        c["power"]["needed_undefined"] = f"why {c['base']}"
    notes = [ln for ln in report.render_markdown(saved).splitlines() if ln.startswith("- `") and ": why " in ln]
    assert notes == ["- `lora-1`: why m", "- `lora-2`: why m", "- `lora-2 vs lora-1`: why lora-1"]
    capsys.readouterr()
    assert cli(["report", *runs, "--out", str(tmp_path / "bad"), "--between", "lora-1"]) == 2
    assert "REFERENCE:OTHER" in capsys.readouterr().err
    assert cli(["report", *runs, "--out", str(tmp_path / "bad"), "--between", "lora-1:nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()
