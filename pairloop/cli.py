"""`pairloop <stage> ...`: one CLI for every stage and the whole loop.

    pairloop gen --config configs/demo.yaml gen.n=32
    pairloop pairs --config configs/demo.yaml
    pairloop train --config configs/demo.yaml
    pairloop eval --config configs/demo.yaml
    pairloop score SAMPLES.jsonl [--problems humaneval|PATH] [--out RESULTS.jsonl]
    pairloop report RESULTS_DIR... [--out DIR]
    pairloop run --config configs/demo.yaml

Each subcommand is the same code as `python -m <stage>`: this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "gen": ("gen.run", "main"),
    "pairs": ("pairs.__main__", "main"),
    "train": ("train.__main__", "main"),
    "eval": ("eval.run", "main"),
    "score": ("eval.score", "main"),
    "report": ("eval.report", "main"),
    "run": ("pairloop.loop", "main"),
    "fetch-model": ("gen.model_source", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"pairloop: unknown command {cmd!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
