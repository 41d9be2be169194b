"""pairs: DPO pairs (chosen = a passing completion, rejected = a failing one of the same problem and model),
balanced over failure categories, streamed from gen's shards. Entry point: `python -m pairs` (pairs/run.py)."""
