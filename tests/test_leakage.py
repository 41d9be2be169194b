"""tasks/leakage.py: the content key, the near-duplicate check, measured on HumanEval, and the provenance record."""

from __future__ import annotations

import json
import re

import pytest

from tasks.leakage import (
    NEAR_THRESHOLD,
    ProblemText,
    content_key,
    find_overlap,
    parse_provenance,
    provenance_record,
    tokens,
)
from tasks.problems import load_problems

# HumanEval's own near-duplicates: pairs of different problems written from one template, with their score at
# n=8 (share of the first's prompt 8-grams found in the second's). All are below NEAR_THRESHOLD (0.8).
HUMANEVAL_NEAR_DUPLICATES = {
    ("HumanEval/43", "HumanEval/40"): 0.7664,  # pairs_sum_to_zero vs triples_sum_to_zero
    ("HumanEval/40", "HumanEval/43"): 0.7523,
    ("HumanEval/7", "HumanEval/29"): 0.7386,  # filter_by_substring vs filter_by_prefix
    ("HumanEval/29", "HumanEval/7"): 0.7222,
    ("HumanEval/37", "HumanEval/33"): 0.602,  # sort_even vs sort_third
    ("HumanEval/35", "HumanEval/30"): 0.541,  # max_element vs get_positive
    ("HumanEval/33", "HumanEval/37"): 0.513,
}


@pytest.fixture(scope="module")
def humaneval():
    return load_problems("humaneval")


def disguise(p, new_id: str) -> ProblemText:
    """A copy under another id: function and first parameter renamed, re-indented, blank lines doubled, a comment."""
    prompt = re.sub(rf"\b{p.entry_point}\b", "renamed_fn", p.prompt)
    m = re.search(r"def renamed_fn\((\w+)", prompt)
    if m:
        prompt = re.sub(rf"\b{m.group(1)}\b", "zz_arg", prompt)
    prompt = "# copied\n" + prompt.replace("    ", "  ").replace("\n\n", "\n\n\n")
    return ProblemText(new_id, prompt, p.test.replace("    ", "\t"))


def test_content_key_ignores_whitespace_indentation_and_comments():
    a = ProblemText("a", "def f(x):\n    \"\"\"Add one.\"\"\"\n", "def check(c):\n    assert c(1) == 2\n")
    b = ProblemText("b", "# a comment\ndef   f( x ):\n  \"\"\"Add\n  one.\"\"\"\n\n",
                    "def check(c):\n\tassert c(1)==2  # ok\n")
    assert content_key(a) == content_key(b)


def test_content_key_keeps_what_changes_the_problem():
    a = ProblemText("a", "def f(x):\n    return '#1'\n", "def check(c):\n    assert c(1) == 2\n")
    assert content_key(a) != content_key(ProblemText("a", a.prompt.replace("#1", "#2"), a.test))  # '#' in a string
    assert content_key(a) != content_key(ProblemText("a", a.prompt, a.test.replace("2", "3")))
    assert content_key(a) != content_key(ProblemText("a", a.prompt + a.test, ""))  # prompt/test boundary counts


def test_renaming_a_function_and_its_parameters_changes_no_token():
    assert tokens("def f(x, *ys, k=1):\n    return x + k  # f(x)\n") == \
        tokens("def g(a, *bs, kk=1):\n    return a + kk\n")


def test_every_disguised_humaneval_copy_is_found_under_its_original(humaneval):
    copies = [disguise(p, f"copy/{p.id}") for p in humaneval]
    result = find_overlap(humaneval, copies)
    found = {f.eval_id: f.train_id for f in result.findings}
    assert found == {f"copy/{p.id}": p.id for p in humaneval}
    assert {f.kind for f in result.findings} <= {"exact", "near"}


def test_humaneval_against_itself_has_no_false_positive_and_its_near_duplicates_are_known(humaneval):
    assert find_overlap(humaneval, humaneval, exclude_self=True).findings == []
    close = find_overlap(humaneval, humaneval, exclude_self=True, threshold=0.5).findings
    assert {(f.eval_id, f.train_id): f.score for f in close} == HUMANEVAL_NEAR_DUPLICATES
    assert max(HUMANEVAL_NEAR_DUPLICATES.values()) < NEAR_THRESHOLD


def test_same_id_is_a_finding_even_when_the_content_differs(humaneval):
    other = ProblemText(humaneval[0].id, "def unrelated(q):\n    pass\n", "def check(c):\n    pass\n")
    result = find_overlap([other], humaneval[:3])
    assert [(f.eval_id, f.kind) for f in result.findings] == [(humaneval[0].id, "id")]


def test_a_prompt_wrapped_in_a_chat_template_is_found(humaneval):
    p = humaneval[10]
    rendered = ProblemText("trained", "<|im_start|>user\nComplete this function:\n```python\n" + p.prompt
                           + "```<|im_end|>\n<|im_start|>assistant\n")
    (f,) = find_overlap([rendered], [p]).findings
    assert (f.eval_id, f.train_id, f.kind, f.score) == (p.id, "trained", "near", 1.0)


def test_compared_summary_says_what_was_compared(humaneval):
    c = find_overlap(humaneval[:5], humaneval[5:9]).compared
    assert (c["train_problems"], c["eval_problems"], c["ngram"], c["threshold"]) == (5, 4, 8, NEAR_THRESHOLD)
    assert c["found"] == {"id": 0, "exact": 0, "near": 0} and "8-grams" in c["method"]


def test_bad_threshold_and_n_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        find_overlap([], [], threshold=0.0)
    with pytest.raises(ValueError, match="n-gram size"):
        find_overlap([], [], n=0)


def test_provenance_round_trip_and_refusals():
    rec = provenance_record([{"spec": "humaneval"}], [{"id": "a", "prompt": "def f():\n", "test": "t",
                                                       "trained_prompts": ["P1", "P2"]}])
    texts, back = parse_provenance(json.dumps(rec).encode(), "here")
    assert back == rec and [(t.id, t.prompt, t.test) for t in texts] == [("a", "def f():\n", "t"), ("a", "P1", ""),
                                                                         ("a", "P2", "")]
    with pytest.raises(ValueError, match="here: no problem provenance record"):
        parse_provenance(None, "here")
    with pytest.raises(ValueError, match="not JSON"):
        parse_provenance(b"{", "here")
    with pytest.raises(ValueError, match="schema"):
        parse_provenance(json.dumps({**rec, "schema": "other/v0"}), "here")
    with pytest.raises(ValueError, match="lists no problems"):
        parse_provenance(json.dumps({**rec, "problems": []}), "here")
    with pytest.raises(ValueError, match="entry 0 is malformed"):
        parse_provenance(json.dumps({**rec, "problems": [{"id": "a", "trained_prompts": [1]}]}), "here")
