"""Serving fixtures: a tiny GPT-2 checkpoint (trained BPE tokenizer + random weights) built in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

DIALOGUES = [
    [{"role": "user", "content": "hello, how are you?"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "你喜欢什么运动?"}, {"role": "assistant", "content": "我喜欢游泳和跑步。"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is ray?"},
     {"role": "assistant", "content": "a framework for distributed python."}],
]


def make_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write a tiny HF checkpoint (safetensors + tokenizer with the chat template) to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatray.data.tokenizer import render_chat, train_tokenizer

    texts = [render_chat(d)[0] for d in DIALOGUES] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok = train_tokenizer(texts, 400, min_frequency=1)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger weights: varied (less repetitive) greedy output from a random model
        for p in model.parameters():
            p.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-ckpt")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, tokenizer) loaded through the serving loader."""
    from chatray.serve.engine import load_for_serving

    return load_for_serving(tiny_checkpoint, device="cpu")
