"""The generation core: continuous batching over a KV cache, per-request sampling, exact stop handling.

Imports only torch, transformers and chatray.model (never Ray): the Serve ``Generator`` deployment wraps it, and
``benchmarks/gpu_serve.py`` drives the very same code on a GPU machine that has no Ray.

How a batch runs (one :meth:`GenerationEngine.step`):
  1. requests cancelled since the last step leave the batch;
  2. one decode step for every running row (one new token each, per-row sampling settings);
  3. waiting requests join: their prompts are prefilled together (left-padded) and merged into the running
     batch's KV cache, so a new request starts at the next step instead of waiting for the batch to drain;
  4. rows that hit EOS, a stop string or ``max_tokens`` leave the batch.

Rows are left-padded to a common cache length; a 2-D attention mask hides the padding and position ids
are counted per row, so a row computes exactly what it would compute alone (up to float rounding).

Beside it: :mod:`~chatray.serve.async_engine` (the step loop on a thread, for asyncio callers),
:mod:`~chatray.serve.kvcache` (the cache across transformers versions), :mod:`~chatray.serve.detokenize`
(streamed text and stop strings), :mod:`~chatray.serve.sampling` (the batched sampler) and
:mod:`~chatray.serve.outputs` (what a step hands back).
"""

from __future__ import annotations

import inspect
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatray.model import config_context_length
from chatray.serve.detokenize import Detokenizer
from chatray.serve.kvcache import cache_kwarg, cache_tensors, new_cache, returned_cache, set_cache_tensors
from chatray.serve.logprobs import TokenLogprob, position_logprobs, prompt_logprobs
from chatray.serve.outputs import Completion, FinishReason, StepOutput, gather_outputs
from chatray.serve.sampling import SamplingParams, make_generator, sample

__all__ = ["GenerationEngine"]

@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    step_logprob: TokenLogprob | None = None  # this step's token, until _consume hands it out
    prompt_lps: tuple[TokenLogprob, ...] | None = None  # computed at prefill, handed out with the first output


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class GenerationEngine:
    """Continuous batching generation over one causal LM (synchronous; not thread-safe except add/abort).

    Args:
        model: a causal LM (GPT-2 family) in eval mode, on its device.
        tokenizer: the matching tokenizer (decodes output; its ``len`` bounds sampled ids).
        max_batch_size: at most this many requests decode together; the rest wait.
        context_length: the model's context (defaults to the model config's, see
            :func:`chatray.model.config_context_length`).
        eos_token_ids: extra ids that end generation (defaults: generation_config and tokenizer EOS).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int,
        context_length: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        cfg = model.config
        # 1024 (GPT-2's context) for a config that names none.
        self.context_length = int(context_length or config_context_length(cfg) or 1024)
        self.device = next(model.parameters()).device
        self.vocab_size = int(cfg.vocab_size)
        # Ids past the tokenizer's vocabulary (padded embedding rows) can never be decoded: never sample them.
        self._vocab_limit = len(tokenizer) if len(tokenizer) < self.vocab_size else None
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = int(pad if pad is not None else 0)
        self._cache_kw = cache_kwarg(model)
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._joining: list[_Sequence] = []
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._reset_batch()
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "steps": 0, "generated_tokens": 0,
                      "max_batch_seen": 0}

    # ------------------------------------------------------------------ public, thread-safe
    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; it joins the batch at the next :meth:`step`.

        Raises:
            ValueError: empty prompt, ids outside the vocabulary, or prompt + max_tokens over the context
                (the message names both numbers), or a duplicate request id.
        """
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt must contain at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        if len(ids) + params.max_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the model's context of {self.context_length} tokens"
            )
        seq = _Sequence(request_id, ids, params, make_generator(params.seed),
                        Detokenizer(self.tokenizer, params.stop))
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._known.add(request_id)
            self._waiting.append(seq)
            self.stats["requests"] += 1

    def abort_request(self, request_id: str) -> None:
        """Drop a request (client gone): it leaves the batch at the next step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._known:
                self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is running or waiting."""
        with self._lock:
            return bool(self._rows or self._waiting)

    def num_running(self) -> int:
        return len(self._rows)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def kv_cache_usage(self) -> float:
        """The share of the cache's capacity (max_batch_size rows x context positions) the batch holds, padding
        included, as vLLM's kv_cache_usage_perc counts allocated blocks; call it between steps (step thread)."""
        rows, width = self._mask.shape if self._mask is not None else (0, 0)
        return rows * width / (self.max_batch_size * self.context_length)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running request by one token and admit waiting ones.

        Returns:
            One :class:`StepOutput` per request that was in the batch (finished ones carry finish_reason).
        """
        outputs: list[StepOutput] = []
        self._drop_aborted()
        if self._rows:
            tokens = self._decode_step()
            outputs += self._consume(self._rows, tokens)
        with self._lock:
            free = self.max_batch_size - len(self._rows)
            joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._joining = joining  # owned by this step until merged: fail_all must see them too
        # Rows scoring their prompt keep every position's logits (T x V each): prefill them apart from the others.
        plain = [s for s in joining if s.params.prompt_logprobs is None]
        for group in (g for g in (plain, [s for s in joining if s.params.prompt_logprobs is not None]) if g):
            state, tokens = self._prefill(group)
            outputs += self._consume(group, tokens)
            self._merge(group, state)
        self._joining = []
        self._drop_finished()
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self._rows))
        return outputs

    def fail_all(self) -> list[str]:
        """Forget every running and waiting request (after an engine error); returns their ids."""
        with self._lock:
            ids = [s.request_id for s in (*self._rows, *self._joining, *self._waiting)]
            ids = list(dict.fromkeys(ids))
            self._waiting.clear()
            self._joining = []
            self._aborted.clear()
            self._known.difference_update(ids)
        self._reset_batch()
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Run ``prompts`` to completion through the batching path (offline use, tests, benchmarks)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        outs: dict[str, list[StepOutput]] = {rid: [] for rid in ids}
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                outs[out.request_id].append(out)
                if out.finish_reason is not None:
                    done[out.request_id] = gather_outputs(outs[out.request_id])
        return [done[rid] for rid in ids]

    # ------------------------------------------------------------------ internals
    def _reset_batch(self) -> None:
        self._rows: list[_Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, T) long: 1 = real token in the cache
        # Per-row tensors, all (B, ...) in the order of _rows; rows join (cat) and leave (index_select) together:
        #   next_pos (B,) position id of the pending token; last (B,) sampled token not yet in the cache;
        #   seen (B, V) bool, tokens in prompt or output; counts (B, V) float, occurrences in the output;
        #   temperature, top_k, top_p, penalty, presence, frequency (B,) each: the rows' sampling settings.
        self._row: dict[str, torch.Tensor] = {}

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 last_only: bool) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if last_only and self._supports_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits, returned_cache(out)  # (B, T or 1, V)

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence],
                row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """One token per row: (B,) on the device (fed back to the model) and as a list (for the host)."""
        want = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        if want:  # logprobs are the raw distribution: keep a copy of the logits before masking and penalties
            pick = torch.tensor(want, dtype=torch.long, device=logits.device)
            raw = logits.index_select(0, pick)  # (W, V)
        if self._vocab_limit is not None:
            logits[:, self._vocab_limit:] = float("-inf")
        uniforms = torch.stack([torch.rand((), generator=s.generator) for s in rows])  # (B,)
        # Decided on the host: a batch without presence/frequency penalties skips their work and a device sync.
        penalize = any(s.params.presence_penalty or s.params.frequency_penalty for s in rows)
        tokens = sample(logits, temperature=row["temperature"], top_k=row["top_k"], top_p=row["top_p"],
                        repetition_penalty=row["penalty"], uniforms=uniforms, seen=row["seen"],
                        counts=row["counts"] if penalize else None, presence_penalty=row["presence"],
                        frequency_penalty=row["frequency"])
        every = torch.arange(len(rows), device=tokens.device)
        row["seen"][every, tokens] = True
        if penalize:
            row["counts"][every, tokens] += 1
        if want:
            k = max(rows[i].params.logprobs or 0 for i in want)
            for i, entry in zip(want, position_logprobs(raw, tokens.index_select(0, pick), k)):
                rows[i].step_logprob = TokenLogprob(entry.token_id, entry.logprob, entry.top[:rows[i].params.logprobs])
        return tokens, tokens.tolist()

    def _decode_step(self) -> list[int]:
        assert self._mask is not None
        row = self._row
        mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)  # (B, T+1)
        logits, self._cache = self._forward(row["last"][:, None], mask, row["next_pos"][:, None], self._cache,
                                            last_only=False)
        self._mask = mask
        row["next_pos"] = row["next_pos"] + 1
        row["last"], tokens = self._sample(logits[:, -1, :], self._rows, row)
        return tokens

    def _row_params(self, rows: list[_Sequence]) -> dict[str, torch.Tensor]:
        dev, n = self.device, len(rows)

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        return {
            "temperature": floats([s.params.temperature for s in rows]),
            "top_k": torch.tensor([min(s.params.top_k, self.vocab_size) for s in rows], dtype=torch.long, device=dev),
            "top_p": floats([s.params.top_p for s in rows]),
            "penalty": floats([s.params.repetition_penalty for s in rows]),
            "presence": floats([s.params.presence_penalty for s in rows]),
            "frequency": floats([s.params.frequency_penalty for s in rows]),
            "seen": torch.zeros((n, self.vocab_size), dtype=torch.bool, device=dev),
            "counts": torch.zeros((n, self.vocab_size), dtype=torch.float32, device=dev),
            "next_pos": torch.tensor([len(s.prompt_ids) for s in rows], dtype=torch.long, device=dev),
        }

    def _prefill(self, rows: list[_Sequence]) -> tuple[tuple[Any, torch.Tensor, dict[str, torch.Tensor]], list[int]]:
        n, width = len(rows), max(len(s.prompt_ids) for s in rows)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(rows):  # left padding: every row's last prompt token sits in the last column
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (n, width): per-row positions, 0 at the first real
        scoring = any(s.params.prompt_logprobs is not None for s in rows)  # then every position's logits are kept
        logits, cache = self._forward(ids, mask, positions, new_cache(), last_only=not scoring)  # (n, T or 1, V)
        for i, s in enumerate(rows):
            if s.params.prompt_logprobs is not None:
                s.prompt_lps = tuple(prompt_logprobs(logits[i, width - len(s.prompt_ids):], s.prompt_ids,
                                                     s.params.prompt_logprobs))
        row = self._row_params(rows)
        row["seen"].scatter_(1, ids, mask.bool())  # prompt tokens count for the repetition penalty; padding does not
        row["last"], tokens = self._sample(logits[:, -1, :], rows, row)
        return (cache, mask, row), tokens

    def _merge(self, rows: list[_Sequence], state: tuple[Any, torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Append prefilled rows (their cache, mask and per-row tensors) to the running batch."""
        cache, mask, row = state
        if not self._rows:
            self._rows, self._cache, self._mask, self._row = list(rows), cache, mask, row
            return
        assert self._mask is not None
        old_t, new_t = self._mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)
        old_kv, new_kv = cache_tensors(self._cache), cache_tensors(cache)
        merged = [
            (torch.cat([_left_pad(ok, width - old_t, 2), _left_pad(nk, width - new_t, 2)], dim=0),
             torch.cat([_left_pad(ov, width - old_t, 2), _left_pad(nv, width - new_t, 2)], dim=0))
            for (ok, ov), (nk, nv) in zip(old_kv, new_kv)
        ]
        set_cache_tensors(self._cache, merged)
        self._mask = torch.cat([_left_pad(self._mask, width - old_t, 1), _left_pad(mask, width - new_t, 1)])
        self._rows += rows
        self._row = {name: torch.cat([t, row[name]]) for name, t in self._row.items()}

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask.index_select(0, idx)
        # Columns that are padding in every remaining row are dead weight: trim them from the left.
        first = int((mask.sum(dim=0) > 0).nonzero()[0])
        self._mask = mask[:, first:]
        set_cache_tensors(self._cache, [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                                         for k, v in cache_tensors(self._cache)])
        self._row = {name: t.index_select(0, idx) for name, t in self._row.items()}

    def _drop_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            aborted, self._aborted = self._aborted, set()
            self._waiting = deque(s for s in self._waiting if s.request_id not in aborted)
            self._known.difference_update(aborted)
        self.stats["aborted"] += len(aborted)
        self._keep_rows([i for i, s in enumerate(self._rows) if s.request_id not in aborted])

    def _drop_finished(self) -> None:
        done = [s.request_id for s in self._rows if s.finish_reason is not None]
        if not done:
            return
        with self._lock:
            self._known.difference_update(done)
        self._keep_rows([i for i, s in enumerate(self._rows) if s.finish_reason is None])

    def _consume(self, rows: list[_Sequence], tokens: list[int]) -> list[StepOutput]:
        outs = []
        for seq, tok in zip(rows, tokens):
            seq.output_ids.append(tok)
            self.stats["generated_tokens"] += 1
            is_eos = tok in self.eos_token_ids and not seq.params.ignore_eos
            if is_eos or seq.text.add(seq.output_ids):
                seq.finish_reason = "stop"
            elif (len(seq.output_ids) >= seq.params.max_tokens
                  or len(seq.prompt_ids) + len(seq.output_ids) >= self.context_length):
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.stats["finished"] += 1
                # What the window still holds goes out at the end; it may complete a stop string.
                if (is_eos or seq.finish_reason == "length") and seq.text.flush(self._text_ids(seq)):
                    seq.finish_reason = "stop"
            delta = seq.text.take(final=seq.finish_reason is not None)
            logprobs = (seq.step_logprob,) if seq.step_logprob is not None else ()
            outs.append(StepOutput(seq.request_id, delta, seq.finish_reason, len(seq.prompt_ids),
                                   len(seq.output_ids), logprobs, seq.prompt_lps))
            seq.step_logprob = seq.prompt_lps = None
        return outs

    def _text_ids(self, seq: _Sequence) -> list[int]:
        """The output ids that make text: an EOS that ended the request is counted but not decoded."""
        return [i for i in seq.output_ids if not (i in self.eos_token_ids and not seq.params.ignore_eos)]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
