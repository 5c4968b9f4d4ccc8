"""Decode steps replayed as CUDA graphs: one graph per (batch bucket, attention-length bucket).

A GPT-2 124M decode step is a few hundred small kernels; launched one by one from Python it takes milliseconds
while the GPU needs well under one. A captured graph launches them all at once. Shapes are fixed per graph, so
a step pads its rows up to the next batch bucket (padding rows write to the cache's scratch position, and their
logits are dropped) and attends over the next attention-length bucket (positions past a row's own are masked).

Graphs are captured lazily, the first time a bucket pair is needed (tens of milliseconds each), in one shared
memory pool; :meth:`DecodeGraphs.warm_up` captures them all up front.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Sequence

import torch

__all__ = ["DecodeGraphs", "GraphCaptureError", "batch_buckets", "length_buckets"]

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured as a CUDA graph (the engine then runs decode steps eagerly)."""


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to ``max_rows`` (vLLM's capture sizes, coarser)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sorted({*sizes, max_rows})


def length_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from ``smallest`` up to ``max_len`` (which is always the last)."""
    sizes, n = [], smallest
    while n < max_len:
        sizes.append(n)
        n *= 2
    return [*sizes, max_len]


def _bucket(buckets: Sequence[int], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


class DecodeGraphs:
    """Replays ``decode(tokens, positions, write_pos, attn_len) -> logits`` as CUDA graphs.

    Args:
        decode: the eager decode step over cache slots ``0..R-1`` (see :meth:`GPT2Forward.decode_logits`).
        max_rows: the most rows a step can have (the cache's slots).
        max_len: the most positions a row can attend to (max_model_len).
        scratch: the cache's scratch position (padding rows write there).
        device: the CUDA device.
    """

    def __init__(self, decode: DecodeFn, *, max_rows: int, max_len: int, scratch: int, device: torch.device) -> None:
        self._decode = decode
        self.rows = batch_buckets(max_rows)
        self.lengths = length_buckets(max_len)
        self._scratch = scratch
        self._device = device
        top = self.rows[-1]
        # Static inputs every graph reads: (3, rows) = tokens, positions, write positions.
        self._inputs = torch.zeros((3, top), dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def __call__(self, inputs: torch.Tensor, attn_len: int) -> torch.Tensor:
        """Run one step.

        Args:
            inputs: (3, R) long on the device: tokens, positions, write positions of slots ``0..R-1``.
            attn_len: the attention length the step needs.

        Returns:
            (R, V) logits (a view of the graph's output: read it before the next call).
        """
        n = inputs.shape[1]
        rows, length = _bucket(self.rows, n), _bucket(self.lengths, attn_len)
        self._inputs[:, :n].copy_(inputs)
        if rows > n:  # padding rows: token 0 at position 0, written nowhere
            self._inputs[:2, n:rows].zero_()
            self._inputs[2, n:rows].fill_(self._scratch)
        with self._on_device():  # graphs are captured and replayed on the engine's own GPU
            graph, out = self._graphs.get((rows, length)) or self._capture(rows, length)
            graph.replay()
        return out[:n]

    def warm_up(self) -> int:
        """Capture every bucket pair now (so no request waits for a capture); returns how many."""
        with self._on_device():
            for rows in self.rows:
                for length in self.lengths:
                    if (rows, length) not in self._graphs:
                        self._capture(rows, length)
        return len(self._graphs)

    def _on_device(self) -> contextlib.AbstractContextManager:
        return torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext()

    def _capture(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        saved = self._inputs.clone()
        try:
            return self._capture_graph(rows, length)
        except Exception as e:
            raise GraphCaptureError(f"capturing the decode step ({rows} rows, {length} positions) as a CUDA graph "
                                    f"failed: {type(e).__name__}: {e}") from e
        finally:
            self._inputs.copy_(saved)

    def _capture_graph(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        tokens, positions, write_pos = self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows]
        write_pos.fill_(self._scratch)  # warm-up and capture runs must not write into any sequence's cache
        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # kernels pick their algorithms (and allocate workspaces) outside the capture
                self._decode(tokens, positions, write_pos, length)
        torch.cuda.current_stream(self._device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # An explicit stream of the engine's device: the default capture stream belongs to the current device.
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            out = self._decode(tokens, positions, write_pos, length)
        self._pool = graph.pool()
        self._graphs[(rows, length)] = (graph, out)
        return graph, out
