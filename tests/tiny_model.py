"""A tiny 2-layer Qwen2 with a small byte-level BPE tokenizer, built locally in seconds.

Real architecture, real tokenizer files, real chat template: vLLM, TRL and PEFT load it exactly as they would
Qwen2.5-Coder. Its weights are random (seeded), so its outputs are deterministic nonsense.

    python tests/tiny_model.py /tmp/tiny-qwen2
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    import inspect
    import json as json_mod
    import textwrap

    texts = [inspect.getsource(m) for m in (textwrap, json_mod.decoder)]
    texts.append("def add(a, b):\n    return a + b\n\n```python\nprint(add(1, 2))\n```\n")
    return texts


def build_tiny_model(path: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    n_vocab = len(fast)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: a size vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    gen_cfg = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg))
    return path


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-qwen2"))


def build_tiny_coder(path: str | Path, problems_jsonl: str | Path, steps: int = 120, seed: int = 0) -> Path:
    """The tiny model, fine-tuned for a few seconds to answer the toy problems in the chat format gen uses.

    Sampled at temperature ~1 it passes some samples and fails others (the mix pairs need), which a model with
    random weights never does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "config.json").exists():
        return path
    base = build_tiny_model(path.parent / (path.name + "-base"), seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    from tasks.problems import load_problems
    from tasks.prompts import build_prompt

    texts = [build_prompt(p, "chat", tokenizer=tok) + "```python\n" + p.reference + "```<|im_end|>"
             for p in load_problems(str(problems_jsonl))]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    tmp = path.parent / (path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text((base / "generation_config.json").read_text())
    os.replace(tmp, path)
    return path
