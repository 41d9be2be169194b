"""Multi-seed evaluation of a base model and adapters.  python -m eval --config configs/demo.yaml

Same code as `pairloop eval` (pairloop/cli.py parses the config)."""

from pairloop.cli import stage_main

if __name__ == "__main__":
    stage_main("eval")
