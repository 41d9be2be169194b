"""Execute untrusted programs against tests and label every run with one outcome.

CONTRACT STUB -- the executor implementation is being written (see issue 2). The public API below is fixed:
other stages import `Outcome`, `Phase`, `Job`, `ExecResult`, `Limits`, `Sandbox` from here.

This module imports nothing from the project, so any stage can use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence


class Outcome(str, enum.Enum):
    """The closed set of verdicts. INFRA_ERROR is a fault of the harness, never the model's failure."""

    PASS = "PASS"
    SYNTAX_ERROR = "SYNTAX_ERROR"
    NAME_ERROR = "NAME_ERROR"
    IMPORT_ERROR = "IMPORT_ERROR"
    TYPE_ERROR = "TYPE_ERROR"
    ASSERTION_FAIL = "ASSERTION_FAIL"
    INDEX_ERROR = "INDEX_ERROR"
    KEY_ERROR = "KEY_ERROR"
    VALUE_ERROR = "VALUE_ERROR"
    ATTRIBUTE_ERROR = "ATTRIBUTE_ERROR"
    ZERO_DIVISION = "ZERO_DIVISION"
    RECURSION = "RECURSION"
    OTHER_EXCEPTION = "OTHER_EXCEPTION"
    TIMEOUT = "TIMEOUT"
    MEMORY = "MEMORY"
    CRASHED = "CRASHED"
    NO_CODE = "NO_CODE"
    INFRA_ERROR = "INFRA_ERROR"

    @property
    def is_model_failure(self) -> bool:
        return self not in (Outcome.PASS, Outcome.INFRA_ERROR)


class Phase(str, enum.Enum):
    DEFINITION = "definition"  # while executing the program itself (module import time)
    TEST = "test"  # while running the problem's tests against it


@dataclass(frozen=True)
class Job:
    program: str  # the full program: prompt + completion as extracted
    test: str  # test code that defines `check(candidate)`
    entry_point: str  # name of the function `check` is called with


@dataclass(frozen=True)
class ExecResult:
    outcome: Outcome
    phase: Phase | None  # None for PASS, NO_CODE, INFRA_ERROR
    error_type: str | None  # exception class name, e.g. "ZeroDivisionError"
    error_message: str | None  # short, truncated
    exec_time_s: float  # CPU seconds used by the job

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0  # CPU-time limit: the primary timeout
    wall_s: float = 30.0  # wall-clock backstop
    memory_mb: int = 2048  # address-space limit
    file_size_mb: int = 64
    max_procs: int = 32


class Sandbox:
    """A pool of warm fork-server workers. Use as a context manager; `run` never raises for a job's fault."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits()) -> None:
        raise NotImplementedError

    def run(self, jobs: Sequence[Job], progress: bool = False) -> list[ExecResult]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
