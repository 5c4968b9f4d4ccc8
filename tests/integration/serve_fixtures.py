"""Helpers for the serving integration tests: a tiny checkpoint, free ports, HTTP polling, load generators."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

DIALOGUES = [
    [{"role": "user", "content": "hello, how are you?"}, {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "你喜欢什么运动?"}, {"role": "assistant", "content": "我喜欢游泳和跑步。"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is ray?"},
     {"role": "assistant", "content": "a framework for distributed python."}],
]


def make_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny HF checkpoint folder: trained BPE tokenizer (chat template) + random GPT-2, safetensors.

    Pass ``<run>/checkpoint_00000001`` and a ``metrics.json`` is written too, so that ``<run>:best`` resolves
    as it does for a training run.
    """
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatray.data.tokenizer import render_chat, train_tokenizer

    texts = [render_chat(d)[0] for d in DIALOGUES] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok = train_tokenizer(texts, 400, min_frequency=1)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger weights: varied greedy output from a random model
        for p in model.parameters():
            p.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"step": 1, "train_loss": 5.0, "eval_loss": 5.0}))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Load:
    """``n`` threads sending ``request()`` in a loop until stopped; counts status codes and exceptions."""

    def __init__(self, request: Callable[[], int], n: int) -> None:
        self._request = request
        self._stop = threading.Event()
        self.codes: Counter = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                code = self._request()
            except Exception as e:  # noqa: BLE001 - a failed request is what we count
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                self.codes[code] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def total(self) -> int:
        return sum(self.codes.values()) + len(self.errors)

    @property
    def failures(self) -> list[str]:
        bad = [f"HTTP {c} x{n}" for c, n in self.codes.items() if c != 200]
        return bad + self.errors
