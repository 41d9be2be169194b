"""TRUNCATED: a program the engine cut at its token limit that does not parse is not the model's SYNTAX_ERROR.

Gen labels it so where rows are written (sandbox.label); readers take the label as written.
"""

from __future__ import annotations

import pytest

from sandbox import Limits, Outcome, Sandbox, label
from tasks.problems import Problem
from tests.test_pairs import write_run

PROMPT = "def f(x):\n    \"\"\"Return x.\"\"\"\n"
TEST = "def check(candidate):\n    assert candidate(1) == 1\n"
CUT = "    return (x +"  # no closing parenthesis: does not compile
CUT_PROGRAM = PROMPT + CUT + "\n"


@pytest.mark.parametrize("outcome, finish, phase, program, want", [
    ("SYNTAX_ERROR", "length", "definition", CUT_PROGRAM, "TRUNCATED"),
    ("SYNTAX_ERROR", "stop", "definition", CUT_PROGRAM, "SYNTAX_ERROR"),  # it stopped by itself: its syntax error
    ("SYNTAX_ERROR", None, "definition", CUT_PROGRAM, "SYNTAX_ERROR"),  # unknown why it stopped
    ("SYNTAX_ERROR", "length", "definition", None, "SYNTAX_ERROR"),  # no program to check
    # cut, but the program compiles: the SyntaxError came from running it (eval("("), raise SyntaxError)
    ("SYNTAX_ERROR", "length", "definition", PROMPT + "    return x\nraise SyntaxError('mine')\n", "SYNTAX_ERROR"),
    ("SYNTAX_ERROR", "length", "test", CUT_PROGRAM, "SYNTAX_ERROR"),  # raised while the tests ran: not a cut
    ("SYNTAX_ERROR", "length", "definition", "x = 1\0\n", "SYNTAX_ERROR"),  # a null byte is the model's
    ("PASS", "length", None, CUT_PROGRAM, "PASS"),
    ("ASSERTION_FAIL", "length", "test", CUT_PROGRAM, "ASSERTION_FAIL"),
    ("NO_CODE", "length", None, None, "NO_CODE"),
])
def test_label(outcome, finish, phase, program, want):
    assert label(outcome, finish, phase, program) == want


def test_a_job_cannot_claim_truncated():
    """Only the engine knows a completion was cut: the job process may not report TRUNCATED for itself."""
    from sandbox import _worker

    assert "TRUNCATED" in _worker.OUTCOMES and "TRUNCATED" not in _worker._JOB_OUTCOMES
    assert Outcome.TRUNCATED.is_model_failure


def test_gen_labels_a_cut_program_truncated():
    from gen.plan import Request, Unit
    from gen.run import _execute_unit

    p = Problem(id="t/f", prompt=PROMPT, entry_point="f", test=TEST, reference=None)
    texts = [(CUT, "length"), (CUT, "stop"), ("    return x\n", "length"),
             ("    return x\nraise SyntaxError('mine')\n", "length"),  # compiles, raises while defined: the model's
             ("    return eval('(')\n", "length")]  # compiles, raises in the test: the model's
    unit = Unit("u0", (Request("t/f", 0, len(texts), 7),))
    outputs = [[{"text": t, "tokens": 4, "finish_reason": f, "cumulative_logprob": None} for t, f in texts]]
    ctx = {"run_id": "r", "seed": 0, "model": "m", "adapter": None, "prompts": {"t/f": PROMPT}, "cpu_limits": {}}
    with Sandbox(workers=1, limits=Limits(cpu_s=2.0, wall_s=10.0)) as box:
        rows = _execute_unit(box, {"t/f": p}, "base", unit, outputs, ctx)
    assert [r["outcome"] for r in rows] == ["TRUNCATED", "SYNTAX_ERROR", "PASS", "SYNTAX_ERROR", "SYNTAX_ERROR"], rows
    assert rows[0]["error_type"] == "SyntaxError" and rows[0]["phase"] == "definition"  # the executor's account kept


def test_pairs_treat_truncated_as_its_own_category_and_count_cut_texts(tmp_path):
    """TRUNCATED gets its own quota; a row written before it existed keeps its label (nothing relabels on read)."""
    from pairs.config import PairsConfig
    from pairs.run import run

    spec = [("PASS", "length"), ("TRUNCATED", "length"), ("ASSERTION_FAIL", "stop"), ("SYNTAX_ERROR", "length")]
    rows = [{"problem_id": "t/f", "model": "m", "adapter": None, "outcome": o, "completion_tokens": 4,
             "completion": f"def f(x):\n    return {i}\n", "phase": None if o == "PASS" else "definition",
             "finish_reason": f} for i, (o, f) in enumerate(spec)]
    inp = write_run(tmp_path / "run", rows, shards=1)
    rep = run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False,
                          num_pairs=3, max_reuse=3))
    assert rep["pairs"] == 3
    assert rep["rejected_outcomes"] == {"ASSERTION_FAIL": 1, "SYNTAX_ERROR": 1, "TRUNCATED": 1}
    assert rep["categories"]["TRUNCATED"]["got"] == 1 and rep["pool"]["outcomes"]["TRUNCATED"] == 1
    assert rep["lengths"]["cut_at_token_limit"] == {"chosen": 3, "rejected": 2}
    assert "Cut at the token limit (finish reason `length`): 3 chosen" in (tmp_path / "out" / "report.md").read_text()
