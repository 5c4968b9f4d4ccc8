"""One builder for the small checkpoints serving tests and benchmarks need (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

DIALOGUES = [
    [{"role": "user", "content": "hello, how are you?"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "你喜欢什么运动?"}, {"role": "assistant", "content": "我喜欢游泳和跑步。"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is ray?"},
     {"role": "assistant", "content": "a framework for distributed python."}],
]


def make_checkpoint(folder: Path, seed: int = 0, size: Literal["tiny", "gpt2-124m"] = "tiny") -> Path:
    """Write a checkpoint folder as training does: safetensors weights, generation config, tokenizer with the
    chat template (a byte-level BPE trained on :data:`DIALOGUES`) and ``metrics.json``.

    ``tiny`` is GPT-2 with 2 layers, width 32 and a 128-token context, its weights scaled up so that greedy
    output from the random model varies; ``gpt2-124m`` has GPT-2 124M's shape (12 x 768, 1024 context,
    50,257-row vocabulary). Pass ``<run>/checkpoint_00000001`` and ``<run>:best`` / ``:latest`` resolve to it.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatray.data.tokenizer import render_chat, train_tokenizer
    from chatray.model import save_model

    texts = [render_chat(d)[0] for d in DIALOGUES] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok = train_tokenizer(texts, 400, min_frequency=1)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
    if size == "tiny":
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tok), **ids)
    else:
        cfg = GPT2Config(**ids)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if size == "tiny":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0)
    save_model(model, tok, folder)
    (folder / "metrics.json").write_text(json.dumps({"step": 1, "train_loss": 5.0, "eval_loss": 5.0}))
    return folder
