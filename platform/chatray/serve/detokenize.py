"""The text one request streams: incremental detokenization and exact stop strings.

Token ids arrive one at a time; the text handed out must be whole characters (a byte-level BPE token can end
inside a UTF-8 sequence), must end just before the first stop string, and must never contain a piece of a
stop string that later completes. Imports nothing (the tokenizer is passed in).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detokenizer"]


class Detokenizer:
    """Turns one request's output ids into text as they arrive.

    Args:
        tokenizer: decodes ids (special tokens skipped).
        stop: strings that end the text; it is cut just before the first one found.

    Attributes:
        text: the decoded text so far (cut at a stop string once one is found).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        # A fast tokenizer's Rust backend decodes exactly as its Python wrapper (which adds only the optional space
        # clean-up, off here) at a fraction of the per-call cost: this runs twice per generated token.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode_ids = backend.decode if backend is not None else self._slow_decode
        self._tokenizer = tokenizer
        self._stop = stop
        self.text = ""
        self._emitted = 0  # characters of `text` already handed out
        # Decoding window, as in TGI/vLLM: ids[prefix:read] were decoded already; decoding ids[prefix:] and
        # subtracting gives the new characters without re-decoding the whole output each step.
        self._prefix = 0
        self._read = 0

    def add(self, ids: list[int]) -> bool:
        """Decode what the newest of ``ids`` (the whole output so far) add.

        While the window ends inside a UTF-8 character nothing is added; the next token completes it.

        Returns:
            Whether the text now holds a stop string (and was cut before it).
        """
        prefix = self._decode(ids[self._prefix:self._read])
        new = self._decode(ids[self._prefix:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._prefix, self._read = self._read, len(ids)
        return self._cut_at_stop()

    def flush(self, ids: list[int]) -> bool:
        """At the end of generation, add whatever the window still holds (even an incomplete character).

        Returns:
            Whether that completed a stop string (and the text was cut before it).
        """
        if self._read >= len(ids):
            return False
        prefix = self._decode(ids[self._prefix:self._read])
        new = self._decode(ids[self._prefix:])
        if len(new) > len(prefix):
            self.text += new[len(prefix):]
        self._read = len(ids)
        return self._cut_at_stop()

    def take(self, final: bool) -> str:
        """The text not handed out yet, marked as handed out.

        Args:
            final: the request finished: hand out everything. Before that, a tail that could be the start of
                a stop string is held back.
        """
        end = len(self.text) if final else len(self.text) - self._stop_prefix_len()
        delta = self.text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=True)

    def _slow_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def _cut_at_stop(self) -> bool:
        if not self._stop:
            return False
        longest = max(len(s) for s in self._stop)
        start = max(0, self._emitted - longest)  # text before `emitted` was checked already
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold
