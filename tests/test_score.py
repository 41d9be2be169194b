"""`pairloop score`: samples file in, results file and summary out, through the real sandbox."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.problems import load_problems
from eval.score import pass_at_k, summarize
from pairloop.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    """`pairloop score ...` as a user runs it (the one CLI; there is no separate argv parser)."""
    return cli(["score", *argv])


@pytest.fixture(scope="module")
def he():
    return {p.id: p for p in load_problems("humaneval")}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _body(p) -> str:
    return p.reference[len(p.prompt):]


@pytest.fixture(scope="module")
def scored(he, tmp_path_factory):
    """A mixed samples file scored once through the real sandbox; (samples rows, results rows, exit code, stdout)."""
    p0, p2 = he["HumanEval/0"], he["HumanEval/2"]
    samples = [
        {"task_id": "HumanEval/2", "completion": _body(p2), "model": "m", "seed": 3},
        {"task_id": "HumanEval/0", "completion": "    return True\n", "model": "m", "seed": 4},
        {"task_id": "HumanEval/0", "completion": _body(p0), "model": "m", "seed": 5},
        {"task_id": "HumanEval/2", "completion": "Sure!\n```python\ndef truncate_number(number):\n"
                                                 "    return number % 1.0\n```\n", "model": "m", "seed": 6},
        {"task_id": "HumanEval/2", "completion": "", "model": "m", "seed": 7},
        {"task_id": "HumanEval/0", "completion": "    return undefined_name\n", "model": "m", "seed": 8},
    ]
    path = _write(tmp_path_factory.mktemp("score") / "samples.jsonl", samples)
    proc = subprocess.run([sys.executable, "-m", "pairloop", "score", str(path), "--workers", "2", "--k", "1,2,3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    out = Path(f"{path}_results.jsonl")
    return samples, _read(out) if out.exists() else None, proc.returncode, proc.stdout + proc.stderr


# ---- pass@k ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 2 / 5),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),  # 1 - 21/252
    (10, 0, 5, 0.0),
    (4, 3, 2, 1.0),  # fewer than k failures: some k-subset always passes
    (200, 1, 100, 0.5),
])
def test_pass_at_k_matches_the_combinatorial_definition(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=3"):
        pass_at_k(2, 1, 3)


def test_summary_excludes_infra_errors_from_n_and_c():
    rows = [
        {"task_id": "A", "outcome": "PASS", "phase": None, "passed": True},
        {"task_id": "A", "outcome": "ASSERTION_FAIL", "phase": "test", "passed": False},
        {"task_id": "A", "outcome": "INFRA_ERROR", "phase": None, "passed": False},
        {"task_id": "B", "outcome": "TIMEOUT", "phase": "test", "passed": False},
        {"task_id": "B", "outcome": "NAME_ERROR", "phase": "definition", "passed": False},
    ]
    s = summarize(rows, ks=(1, 2, 10))
    # A: n=2, c=1 -> pass@1 0.5, pass@2 1.0; B: n=2, c=0 -> 0; k=10 > fewest samples (2): not reported
    assert s["pass_at_k"] == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    assert s["infra_errors"] == 1


def test_summary_leaves_out_tasks_with_only_infra_errors():
    rows = [
        {"task_id": "A", "outcome": "PASS", "phase": None, "passed": True},
        {"task_id": "B", "outcome": "INFRA_ERROR", "phase": None, "passed": False},
    ]
    s = summarize(rows, ks=(1,))
    assert s["pass_at_k"] == {1: 1.0} and s["tasks_scored"] == 1 and s["tasks"] == 2


# ---- a real scoring run ---------------------------------------------------------------------------------------


def test_writes_default_output_path(scored):
    assert scored[1] is not None, scored[3]


def test_one_row_per_sample_in_input_order(scored):
    samples, results, _, _ = scored
    assert [(r["task_id"], r["seed"]) for r in results] == [(s["task_id"], s["seed"]) for s in samples]


def test_input_fields_are_kept(scored):
    samples, results, _, _ = scored
    assert all({k: r[k] for k in s} == s for s, r in zip(samples, results))


def test_outcomes_are_the_expected_ones(scored):
    _, results, _, output = scored
    assert [(r["outcome"], r["phase"]) for r in results] == [
        ("PASS", None),
        ("ASSERTION_FAIL", "test"),
        ("PASS", None),
        ("PASS", None),  # fenced, restated: extracted
        ("NO_CODE", None),
        ("NAME_ERROR", "test"),
    ], output


def test_passed_matches_outcome(scored):
    _, results, _, _ = scored
    assert all(r["passed"] is (r["outcome"] == "PASS") for r in results)


def test_error_type_is_reported(scored):
    _, results, _, _ = scored
    assert results[5]["error_type"] == "NameError" and "undefined_name" in results[5]["error_message"]


def test_summary_prints_pass_at_k_for_k_up_to_the_fewest_samples(scored):
    _, _, code, output = scored
    # HumanEval/0: 3 samples, 1 pass; HumanEval/2: 3 samples, 2 pass -> pass@1 = (1/3 + 2/3) / 2
    assert code == 0, output
    assert "pass@1: 0.5000" in output
    assert f"pass@2: {((1 - 1 / 3) + 1.0) / 2:.4f}" in output  # 1 - C(2,2)/C(3,2) = 2/3; 1 - C(1,2)/.. = 1
    assert "pass@3: 1.0000" in output and "pass@10:" not in output


def test_summary_table_counts_outcomes_by_phase(scored):
    _, _, _, output = scored
    table = {line.split()[0]: line.split()[1:] for line in output.splitlines() if line[:1].isupper()}
    assert table["PASS"] == ["0", "0", "3", "3"] and table["NAME_ERROR"] == ["0", "1", "0", "1"]


def test_explicit_out_path_and_custom_problem_set(tmp_path):
    problems = _write(tmp_path / "set.jsonl", [{
        "task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    }])
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "t/0", "completion": "    return a + b\n"},
                                            {"task_id": "t/0", "completion": "    return a - b\n"}])
    out = tmp_path / "sub" / "r.jsonl"
    assert main([str(samples), "--problems", str(problems), "--out", str(out), "--workers", "1"]) == 0
    assert [r["passed"] for r in _read(out)] == [True, False]
    assert not Path(f"{samples}_results.jsonl").exists()
    assert [p.name for p in out.parent.iterdir()] == ["r.jsonl"]  # no temp file left behind


def test_pairloop_cli_dispatches_to_score(tmp_path, he):
    from pairloop.cli import main as pairloop_main

    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/2", "completion": _body(he["HumanEval/2"])}])
    assert pairloop_main(["score", str(samples), "--workers", "1"]) == 0
    assert _read(Path(f"{samples}_results.jsonl"))[0]["outcome"] == "PASS"


# ---- bad input: exit 2, a message naming line and field, nothing written ---------------------------------------


BAD_INPUTS = {
    "unknown_task": ([{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "HumanEval/999", "completion": "x"}],
                     [":2:", "'task_id'", "HumanEval/999"]),
    "malformed_json": ([{"task_id": "HumanEval/0", "completion": "x"}, "", '{"task_id": "HumanEval/1", "compl'],
                       [":3:", "malformed JSON"]),
    "missing_completion": ([{"task_id": "HumanEval/0"}], [":1:", "missing field 'completion'"]),
    "missing_task_id": ([{"completion": "    return 1\n"}], [":1:", "missing field 'task_id'"]),
    "completion_not_string": ([{"task_id": "HumanEval/0", "completion": None}], [":1:", "'completion'", "string"]),
    "not_an_object": (['["HumanEval/0", "x"]'], [":1:", "JSON object"]),
    "empty_file": ([], ["no samples"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_samples_exit_2_naming_line_and_field(tmp_path, capsys, case):
    rows, expected = BAD_INPUTS[case]
    samples = _write(tmp_path / "s.jsonl", rows)
    assert main([str(samples)]) == 2
    err = capsys.readouterr().err
    assert all(e in err for e in expected), err


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_samples_write_nothing(tmp_path, case):
    samples = _write(tmp_path / "s.jsonl", BAD_INPUTS[case][0])
    main([str(samples)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_bad_samples_leave_an_existing_results_file_untouched(tmp_path):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "nope", "completion": "x"}])
    out = tmp_path / "r.jsonl"
    out.write_text("previous results\n")
    assert main([str(samples), "--out", str(out)]) == 2
    assert out.read_text() == "previous results\n"


def test_unknown_problem_set_exits_2_naming_it(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}])
    assert main([str(samples), "--problems", "humanevalx"]) == 2
    assert "'humanevalx'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_missing_samples_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_out_equal_to_samples_is_refused(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}])
    assert main([str(samples), "--out", str(samples)]) == 2
    assert "out" in capsys.readouterr().err and _read(samples) == [{"task_id": "HumanEval/0", "completion": "x"}]


@pytest.mark.parametrize("args,field", [(["--k", "1,x"], "--k"), (["--k", "0"], "k"), (["--workers", "0"], "workers")])
def test_bad_options_exit_2_naming_them(tmp_path, capsys, args, field):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}])
    assert main([str(samples), *args]) == 2
    assert field in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_infra_errors_are_excluded_reported_and_exit_1(tmp_path, capsys):
    """A problem whose own test code doesn't compile is our fault, not the model's: INFRA_ERROR."""
    problems = _write(tmp_path / "set.jsonl", [
        {"task_id": "t/ok", "prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
        {"task_id": "t/broken", "prompt": "def sub(a, b):\n", "entry_point": "sub",
         "test": "def check(candidate):\n    assert candidate(3, 2) == 1\n)\n"},
    ])
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "t/ok", "completion": "    return a + b\n"},
                                            {"task_id": "t/broken", "completion": "    return a - b\n"}])
    assert main([str(samples), "--problems", str(problems), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert [r["outcome"] for r in _read(Path(f"{samples}_results.jsonl"))] == ["PASS", "INFRA_ERROR"]
    assert "pass@1: 1.0000" in out and "1 INFRA_ERROR" in out
