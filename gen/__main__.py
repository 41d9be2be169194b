"""Oversample completions into Parquet shards.  python -m gen --config configs/demo.yaml gen.n=32

Same code as `pairloop gen` (pairloop/cli.py parses the config)."""

from pairloop.cli import stage_main

if __name__ == "__main__":
    stage_main("gen")
