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
    """(model, tokenizer) loaded through the serving loader."""
    from chatray.serve.engine import load_for_serving

    return load_for_serving(tiny_checkpoint, device="cpu")
