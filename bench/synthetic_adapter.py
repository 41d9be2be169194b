"""A LoRA adapter and a pairs file to run bench/hotload_power.py on where no trained adapter is at hand.

    .venv/bin/python bench/synthetic_adapter.py --out /tmp/synth --scale 2e-4
    .venv/bin/python bench/hotload_power.py --adapter /tmp/synth/adapter --pairs /tmp/synth/pairs

The adapter is PEFT's LoRA (r 16, alpha 32, every attention and MLP projection) with lora_B drawn from a seeded
N(0, scale^2) instead of PEFT's zeros: it moves every token a little, in a random direction. A trained adapter
moves its training texts most; this one does not, so its effect on the probe's training texts says nothing about a
real adapter's. What it is for: the check's cost (which depends on the probe's tokens, not the weights) and the
engine's noise per dtype (which depends on the base weights). The pairs are bench/train_speed.py's synthetic code
pairs, as chat messages: what train/ would have recorded as the probe's training texts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True, help="a new folder: adapter/ and pairs/pairs.parquet go there")
    ap.add_argument("--scale", type=float, default=2e-4, help="std of lora_B's entries")
    ap.add_argument("--pair-tokens", type=int, default=640, help="tokens of each synthetic pair (prompt + completion)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.scale > 0:
        print(f"--scale {a.scale!r}: must be > 0 (0 is PEFT's no-op adapter)", file=sys.stderr)
        sys.exit(2)
    if a.pair_tokens < 64:
        print(f"--pair-tokens {a.pair_tokens!r}: must be >= 64", file=sys.stderr)
        sys.exit(2)
    out = Path(a.out)
    if out.exists():
        print(f"--out {a.out!r}: exists; give a new folder", file=sys.stderr)
        sys.exit(2)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.train_speed import synthetic_pairs
    from gen.model_source import resolve_model
    from gen.probe import PROBE_PAIRS

    model_path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * a.scale)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp / "adapter")
    rows = synthetic_pairs(PROBE_PAIRS, model_path, tok, a.pair_tokens)
    (tmp / "pairs").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                   tmp / "pairs" / "pairs.parquet")
    tmp.rename(out)
    print(f"{out}/adapter (lora_B ~ N(0, {a.scale:g}^2), seed {a.seed}) and {out}/pairs/pairs.parquet "
          f"({len(rows)} pairs of ~{a.pair_tokens} tokens)")


if __name__ == "__main__":
    main()
