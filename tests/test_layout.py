"""The house's arrows, walked over every import: tasks <- sandbox <- gen <- {pairs, eval, train} <- pairloop.

The foundation (tasks/, sandbox/) imports no stage; sandbox/ imports nothing of the project and only the standard
library; no stage imports the CLI package (its `__main__.py` may: that file is only `python -m <stage>` calling
the one CLI); no stage parses argv.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("tasks", "sandbox", "gen", "pairs", "train", "eval", "pairloop")
STAGES = ("gen", "pairs", "train", "eval")


def imports(package: str, skip_main: bool = True) -> list[tuple[str, str]]:
    """(file, top-level module) for every import statement in a package, function-level imports included."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if skip_main and path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), a.name.split(".")[0]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import: inside its own package
                    out.append((str(path.relative_to(ROOT)), package))
                elif node.module:
                    out.append((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return out


def test_every_package_is_walked():
    for pkg in PROJECT:
        assert imports(pkg), f"{pkg}/ has no imports at all: is the walk looking in the right place?"


@pytest.mark.parametrize("package", ["tasks", "sandbox"])
def test_foundation_imports_no_stage_and_not_the_cli(package):
    bad = [(f, m) for f, m in imports(package, skip_main=False) if m in STAGES + ("pairloop",)]
    assert not bad, bad


def test_sandbox_imports_only_the_standard_library():
    bad = [(f, m) for f, m in imports("sandbox", skip_main=False)
           if m != "sandbox" and m not in sys.stdlib_module_names and m != "__future__"]
    assert not bad, bad


def test_tasks_imports_nothing_of_the_project_but_itself():
    bad = [(f, m) for f, m in imports("tasks", skip_main=False) if m in PROJECT and m != "tasks"]
    assert not bad, bad


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_the_cli_package(stage):
    bad = [(f, m) for f, m in imports(stage) if m == "pairloop"]
    assert not bad, bad


def test_gen_imports_no_later_stage():
    bad = [(f, m) for f, m in imports("gen") if m in ("pairs", "train", "eval")]
    assert not bad, bad


@pytest.mark.parametrize("stage", STAGES + ("tasks", "sandbox"))
def test_no_stage_parses_argv(stage):
    """One parser, in the CLI: argparse and sys.argv belong to pairloop/ alone."""
    for path in sorted((ROOT / stage).rglob("*.py")):
        if path.name == "__main__.py" or path.relative_to(ROOT).as_posix() == "sandbox/_worker.py":
            continue  # the worker's argv is the executor's private protocol (its config JSON), not a CLI
        text = path.read_text()
        assert "argparse" not in text and "sys.argv" not in text, path
