"""Train a LoRA adapter on DPO pairs.

    python -m train --config configs/demo.yaml train.pairs=runs/demo/pairs train.out=runs/demo/adapter
    pairloop train pairs=runs/demo/pairs out=runs/demo/adapter model=default lora_r=16
    accelerate launch --num_processes 8 -m train --config configs/demo.yaml     # several GPUs (DDP)

Fields and defaults: train.dpo.TrainConfig. Output: see train/dpo.py.

Same code as `pairloop train` (pairloop/cli.py parses the config)."""

from pairloop.cli import stage_main

if __name__ == "__main__":
    stage_main("train")
