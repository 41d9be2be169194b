"""TRUNCATED: a program the engine cut at its token limit that does not parse is not the model's SYNTAX_ERROR.

Gen labels it so where rows are written; pairs' pool and eval's counts relabel rows written before that existed.
"""

from __future__ import annotations

import numpy as np
import pytest

from gen.shards import rows_to_table
from pairs.pool import OUTCOMES, scan_pool
from sandbox import Limits, Outcome, Sandbox, label
from tasks.problems import Problem
from tests.test_pairs import write_run

PROMPT = "def f(x):\n    \"\"\"Return x.\"\"\"\n"
TEST = "def check(candidate):\n    assert candidate(1) == 1\n"
CUT = "    return (x +"  # no closing parenthesis: does not compile


@pytest.mark.parametrize("outcome, finish, want", [
    ("SYNTAX_ERROR", "length", "TRUNCATED"),
    ("SYNTAX_ERROR", "stop", "SYNTAX_ERROR"),  # the model wrote it and stopped: its syntax error
    ("SYNTAX_ERROR", None, "SYNTAX_ERROR"),  # unknown why it stopped: the executor's word stands
    ("PASS", "length", "PASS"),  # cut after a complete program: still a pass
    ("ASSERTION_FAIL", "length", "ASSERTION_FAIL"),  # it parsed and ran: the model's wrong answer
    ("NO_CODE", "length", "NO_CODE"),
])
def test_label(outcome, finish, want):
    assert label(outcome, finish) == want


def test_a_job_cannot_claim_truncated():
    """Only the engine knows a completion was cut: the job process may not report TRUNCATED for itself."""
    from sandbox import _worker

    assert "TRUNCATED" in _worker.OUTCOMES and "TRUNCATED" not in _worker._JOB_OUTCOMES
    assert Outcome.TRUNCATED.is_model_failure


def test_gen_labels_a_cut_program_truncated():
    from gen.plan import Request, Unit
    from gen.run import _execute_unit

    p = Problem(id="t/f", prompt=PROMPT, entry_point="f", test=TEST, reference=None)
    texts = [(CUT, "length"), (CUT, "stop"), ("    return x\n", "length")]
    unit = Unit("u0", (Request("t/f", 0, len(texts), 7),))
    outputs = [[{"text": t, "tokens": 4, "finish_reason": f, "cumulative_logprob": None} for t, f in texts]]
    ctx = {"run_id": "r", "seed": 0, "model": "m", "adapter": None, "prompts": {"t/f": PROMPT}, "cpu_limits": {}}
    with Sandbox(workers=1, limits=Limits(cpu_s=2.0, wall_s=10.0)) as box:
        rows = _execute_unit(box, {"t/f": p}, "base", unit, outputs, ctx)
    assert [r["outcome"] for r in rows] == ["TRUNCATED", "SYNTAX_ERROR", "PASS"], rows
    assert rows[0]["error_type"] == "SyntaxError" and rows[0]["phase"] == "definition"  # the executor's account kept


def _legacy_rows():
    """Rows as gen wrote them before TRUNCATED existed: a cut program said SYNTAX_ERROR."""
    out = []
    for i, (outcome, finish) in enumerate([("PASS", "stop"), ("SYNTAX_ERROR", "length"), ("SYNTAX_ERROR", "stop"),
                                           ("SYNTAX_ERROR", "length"), ("ASSERTION_FAIL", "length")]):
        out.append({"problem_id": "t/f", "model": "m", "adapter": None, "outcome": outcome,
                    "phase": None if outcome == "PASS" else "definition", "completion": f"def f(x):\n    return {i}\n",
                    "completion_tokens": 4, "finish_reason": finish})
    return out


def test_the_pool_relabels_rows_written_before(tmp_path):
    pool = scan_pool([write_run(tmp_path / "run", _legacy_rows(), shards=2)], progress=False)
    got = sorted(OUTCOMES[o] for o in pool.outcome)
    assert got == sorted(["PASS", "TRUNCATED", "SYNTAX_ERROR", "TRUNCATED", "ASSERTION_FAIL"])


def test_eval_counts_relabel_rows_written_before():
    from eval import stats

    rows = [dict(r, run_id="e", unit_id="u", sample_index=i, run_seed=0, seed=i, prompt="p", cumulative_logprob=None,
                 error_type=None, error_message=None, exec_time_s=0.0) for i, r in enumerate(_legacy_rows())]
    (vc,) = stats.count_outcomes(rows_to_table(rows))
    by = vc.counts.sum(axis=(0, 1, 3))
    names = [o.value for o in stats.OUTCOMES]
    assert {n: int(v) for n, v in zip(names, by) if v} == {"PASS": 1, "TRUNCATED": 2, "SYNTAX_ERROR": 1,
                                                           "ASSERTION_FAIL": 1}
    assert np.array_equal(stats.seed_pass_at_1(vc), [0.2])


def test_pairs_treat_truncated_as_its_own_category_and_count_cut_texts(tmp_path):
    from pairs.config import PairsConfig
    from pairs.run import run

    rows = [{"problem_id": "t/f", "model": "m", "adapter": None, "outcome": o,
             "completion": f"def f(x):\n    return {i}\n", "phase": None if o == "PASS" else "definition", "completion_tokens": 4, "finish_reason": f}
            for i, (o, f) in enumerate([("PASS", "length"), ("SYNTAX_ERROR", "length"), ("ASSERTION_FAIL", "stop")])]
    inp = write_run(tmp_path / "run", rows, shards=1)
    rep = run(PairsConfig(allow_no_eval_set=True, inputs=[inp], out=str(tmp_path / "out"), progress=False,
                          num_pairs=2, max_reuse=2))
    assert rep["pairs"] == 2 and rep["rejected_outcomes"] == {"ASSERTION_FAIL": 1, "TRUNCATED": 1}
    assert rep["categories"]["TRUNCATED"]["got"] == 1 and rep["pool"]["outcomes"]["TRUNCATED"] == 1
    assert rep["lengths"]["cut_at_token_limit"] == {"chosen": 2, "rejected": 1}
    assert "Cut at the token limit (finish reason `length`): 2 chosen" in (tmp_path / "out" / "report.md").read_text()
