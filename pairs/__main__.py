"""Choose balanced DPO pairs from gen runs.  python -m pairs --config configs/demo.yaml pairs.num_pairs=500

Same code as `pairloop pairs` (pairloop/cli.py parses the config)."""

from pairloop.cli import stage_main

if __name__ == "__main__":
    stage_main("pairs")
