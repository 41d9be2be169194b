"""Train a LoRA adapter on DPO pairs.

    python -m train --config configs/demo.yaml train.pairs=runs/demo/pairs train.out=runs/demo/adapter
    pairloop train pairs=runs/demo/pairs out=runs/demo/adapter model=default lora_r=16
    accelerate launch --num_processes 8 -m train --config configs/demo.yaml     # several GPUs (DDP)

Fields and defaults: train.dpo.TrainConfig. Output: see train/dpo.py.
"""

from __future__ import annotations

import sys

from pairloop.config import load_config
from train.dpo import TrainConfig, train


def main(argv: list[str]) -> int:
    cfg = load_config(TrainConfig, argv, section="train")
    out = train(cfg)
    print(f"train: adapter in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
