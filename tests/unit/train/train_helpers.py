"""Tiny prepared datasets and checkpoints written in-process, without Ray (for unit tests).

The dataset follows the prepared-dataset contract (manifest.json, tokenizer/, train|eval/part-*.parquet)
and is encoded with chatray's own encoder, so rows look exactly like ``chatray data prepare`` output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Learnable little dialogues: 'what comes after X?' -> 'after X comes Y.'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(WORDS) - 1)
            turns += [{"role": "user", "content": f"what comes after {WORDS[i]}?"},
                      {"role": "assistant", "content": f"after {WORDS[i]} comes {WORDS[i + 1]}."}]
        out.append(turns)
    return out


def make_dataset(folder: Path, n_train: int = 120, n_eval: int = 16, max_length: int = 64, vocab: int = 400,
                 shards: int = 2) -> Path:
    """Write a prepared dataset to ``folder``; returns it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatray.data.encode import encode_batch
    from chatray.data.tokenizer import CHAT_TEMPLATE, render_chat, tokenizer_fingerprint, train_tokenizer

    convs = conversations(n_train + n_eval)
    tok = train_tokenizer([render_chat(c)[0] for c in convs], vocab, min_frequency=1, max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder / "tokenizer"))
    splits: dict[str, Any] = {}
    for split, part in (("train", convs[:n_train]), ("eval", convs[n_train:])):
        ids, labs, _ = encode_batch(tok.backend_tokenizer, part, max_length)
        (folder / split).mkdir(exist_ok=True)
        files = []
        k = shards if split == "train" else 1
        for s in range(k):
            rows = range(s, len(ids), k)
            table = pa.table({"input_ids": pa.array([ids[i].tolist() for i in rows], pa.list_(pa.int32())),
                              "labels": pa.array([labs[i].tolist() for i in rows], pa.list_(pa.int32())),
                              "length": pa.array([len(ids[i]) for i in rows], pa.int32())})
            name = f"{split}/part-{s:05d}.parquet"
            pq.write_table(table, folder / name)
            files.append(name)
        splits[split] = {"rows": len(ids), "tokens": int(sum(len(x) for x in ids)),
                         "loss_tokens": int(sum((x != -100).sum() for x in labs)), "files": files}
    manifest = {"format_version": 1, "max_length": max_length, "chat_template": CHAT_TEMPLATE, "splits": splits,
                "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                              "source": f"train:{vocab}"},
                "counts": {}, "sources": []}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return folder


def make_checkpoint(run: Path, step: int, *, eval_loss: float | None, dataset: Path, n_layer: int = 1,
                    with_train_state: bool = True, config: dict[str, Any] | None = None) -> Path:
    """A checkpoint folder in the training layout, made with the real save code."""
    import torch

    from chatray.data.dataset import load_tokenizer
    from chatray.model import build_model, save_model
    from chatray.storage.checkpoints import checkpoint_dir_name
    from chatray.train.state import TRAIN_STATE_VERSION

    tok = load_tokenizer(str(dataset))
    model = build_model("tiny", vocab_size=len(tok), block_size=64, eos_token_id=tok.eos_token_id, n_layer=n_layer,
                        n_head=2, n_embd=32, seed=step)
    out = run / checkpoint_dir_name(step)
    save_model(model, tok, out)
    if with_train_state:
        torch.save({"version": TRAIN_STATE_VERSION, "trainer": {"step": step}}, out / "train_state.pt")
    if config is not None:
        (out / "train_config.json").write_text(json.dumps(config), encoding="utf-8")
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    (out / "metrics.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss, "files": files}),
                                      encoding="utf-8")
    return out
