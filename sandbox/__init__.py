"""The executor: runs untrusted completions against a problem's tests and labels each one. Standard library only.

    from sandbox import Job, Limits, Sandbox
    with Sandbox(workers=2, limits=Limits(cpu_s=5)) as box:
        results = box.run([Job(program=..., test=..., entry_point=...)])

See sandbox/executor.py and docs/sandbox.md for what it isolates and what it does not.
"""

from sandbox.executor import ExecResult, Isolation, Job, Limits, Outcome, Phase, Sandbox, label

__all__ = ["ExecResult", "Isolation", "Job", "Limits", "Outcome", "Phase", "Sandbox", "label"]
