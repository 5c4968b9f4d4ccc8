"""Plain Hugging Face model folders and a hub cache, built in-process (nothing is downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["REVISION", "make_hub_cache", "make_plain_folder"]

REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_plain_folder(folder: Path, seed: int = 0) -> Path:
    """A ``save_pretrained`` GPT-2 folder as another tool writes it: weights, config and a tokenizer with no
    chat template, and no chatray ``metrics.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from support.checkpoints import make_checkpoint

    tmp = make_checkpoint(folder.parent / f".{folder.name}-src", seed=seed)
    model, tok = AutoModelForCausalLM.from_pretrained(tmp), AutoTokenizer.from_pretrained(tmp)
    tok.chat_template = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.rmtree(tmp)
    return folder


def make_hub_cache(cache: Path, repo_id: str, seed: int = 0) -> Path:
    """A Hugging Face hub cache (``HF_HUB_CACHE`` layout) holding ``repo_id`` at :data:`REVISION` as ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    make_plain_folder(repo / "snapshots" / REVISION, seed=seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return repo / "snapshots" / REVISION
