"""Serving fixtures: a tiny GPT-2 checkpoint (trained BPE tokenizer + random weights) built in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-ckpt")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, tokenizer) loaded as a CPU replica loads them."""
    from chatray.model import load_model, load_model_tokenizer

    return load_model(tiny_checkpoint, device="cpu", dtype="auto"), load_model_tokenizer(tiny_checkpoint)
