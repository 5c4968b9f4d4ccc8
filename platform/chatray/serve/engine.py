"""The generation core: a KV cache allocated once, scheduling by token budget, sampling on the device.

Imports only torch, transformers and chatray (never Ray): the Serve ``Generator`` deployment wraps it, and
``benchmarks/gpu_serve.py`` drives the very same code on a GPU machine that has no Ray.

How a batch runs (one :meth:`GenerationEngine.step`):
  1. requests cancelled since the last step leave (their cache slots are freed, nothing else moves);
  2. one decode step for every running sequence: one forward over cache slots ``0..R-1`` (replayed as a CUDA
     graph on a GPU), one token each, sampled on the device with each request's own settings and seed;
  3. prompts are prefilled with the tokens left in ``max_num_batched_tokens``, in arrival order; a long prompt
     is cut into chunks over several steps; a completed prompt samples its first token and starts decoding;
  4. sequences that hit EOS, a stop string or ``max_tokens`` leave and free their slot.

The step goes to the host once, for the sampled token ids (and for logprobs, when a request asks for them).
A request that fails fails alone: the engine retries a failed forward row by row to find it, then goes on.

Beside it: :mod:`~chatray.serve.gpt2` (the forward pass), :mod:`~chatray.serve.kvcache` (the cache),
:mod:`~chatray.serve.scheduler` (who runs), :mod:`~chatray.serve.slotstate` and :mod:`~chatray.serve.sampling`
(the sampler), :mod:`~chatray.serve.cudagraphs`, :mod:`~chatray.serve.detokenize` (streamed text and stop strings),
:mod:`~chatray.serve.outputs` (what a step hands back) and :mod:`~chatray.serve.async_engine` (the step loop on a
thread, for asyncio callers).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from chatray.model import config_context_length
from chatray.serve.cudagraphs import DecodeGraphs, GraphCaptureError
from chatray.serve.detokenize import Detokenizer
from chatray.serve.gpt2 import GPT2Forward
from chatray.serve.kvcache import KVCache, cache_slots_for_budget, gpu_cache_budget
from chatray.serve.logprobs import TokenLogprob, position_logprobs
from chatray.serve.outputs import Completion, EngineError, StepOutput, gather_outputs
from chatray.serve.sampling import SamplerPlan, SamplingParams, new_seed, sample, seeded_uniforms
from chatray.serve.scheduler import Chunk, Scheduler
from chatray.serve.scheduler import Sequence as Seq
from chatray.serve.slotstate import SlotState

__all__ = ["GenerationEngine"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GenerationEngine:
    """Continuous batching generation over one GPT-2-family model (synchronous; add/abort are thread-safe).

    Args:
        model: a ``GPT2LMHeadModel`` in eval mode, on its device and dtype.
        tokenizer: the matching tokenizer (decodes output; its ``len`` bounds sampled ids).
        max_batch_size: sequences that run at once (vLLM's ``max_num_seqs``): the KV cache's slots.
        max_model_len: the most tokens (prompt + output) of one request (default: the model's context).
        max_num_batched_tokens: tokens one step processes (decode tokens first, then prompt chunks); must
            exceed ``max_batch_size`` so that prompts always make progress.
        kv_cache_bytes: memory the KV cache may take; fewer slots than ``max_batch_size`` when it holds fewer
            (None: no limit on CPU; on a GPU, ``gpu_memory_utilization`` of the card minus what is in use).
        gpu_memory_utilization: share of the GPU's memory this replica may use in all (weights, cache, work).
        cuda_graphs: replay decode steps as CUDA graphs (on a CUDA device only).
        eos_token_ids: ids that end generation (defaults: generation_config and tokenizer EOS).
        context_length: an older name of ``max_model_len``.

    Raises:
        ValueError: a model this engine cannot serve, or settings that cannot work (each named).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9, cuda_graphs: bool = True,
                 eos_token_ids: Sequence[int] | None = None, context_length: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_num_batched_tokens <= max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed max_batch_size "
                             f"({max_batch_size}): every step decodes up to max_batch_size tokens first")
        self.model = model
        self.tokenizer = tokenizer
        self.forward = GPT2Forward(model)
        ctx = int(config_context_length(model.config) or 1024)
        self.context_length = int(max_model_len or context_length or ctx)
        if self.context_length > ctx:
            raise ValueError(f"max_model_len {self.context_length} exceeds the model's context of {ctx} tokens")
        self.device = self.forward.device
        self.vocab_size = int(model.config.vocab_size)
        # Ids past the tokenizer's vocabulary (padded embedding rows) can never be decoded: never sample them.
        self._vocab_limit = len(tokenizer) if len(tokenizer) < self.vocab_size else None
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        shape = self.forward.cache_shape(self.context_length)
        if kv_cache_bytes is None and self.device.type == "cuda":
            kv_cache_bytes = gpu_cache_budget(self.device, gpu_memory_utilization, max_num_batched_tokens,
                                               self.vocab_size, self.forward.n_embd)
        slots = cache_slots_for_budget(shape, self.forward.dtype, max_batch_size, kv_cache_bytes)
        self.cache = KVCache(shape, slots, self.forward.dtype, self.device)
        self.max_batch_size = slots
        self.slots = SlotState(slots, self.vocab_size, self.device)
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens)
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self._graphs = DecodeGraphs(self._eager_decode, max_rows=slots, max_len=self.context_length,
                                        scratch=self.cache.scratch, device=self.device)
        self._lock = threading.Lock()
        self._incoming: list[Seq] = []
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._failures: list[tuple[str, str]] = []
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "failed": 0, "steps": 0, "generated_tokens": 0,
                      "max_batch_seen": 0}

    # ------------------------------------------------------------------ public, thread-safe
    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; it starts at the next :meth:`step` that has a free slot.

        Raises:
            ValueError: empty prompt, ids outside the vocabulary, or prompt + max_tokens over max_model_len
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
        seq = Seq(request_id, ids, params, new_seed(params.seed), Detokenizer(self.tokenizer, params.stop))
        with self._lock:
            if request_id in self._known:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._known.add(request_id)
            self._incoming.append(seq)
            self.stats["requests"] += 1

    def abort_request(self, request_id: str) -> None:
        """Drop a request (client gone): it leaves at the next step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._known:
                self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is running or waiting."""
        with self._lock:
            return bool(self._incoming or self._aborted or self.scheduler.waiting or self.scheduler.holding_slots())

    def num_running(self) -> int:
        return len(self.scheduler.holding_slots())

    def num_waiting(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting) + len(self._incoming)

    def kv_cache_usage(self) -> float:
        """The share of the KV cache's slots held by requests (call it between steps, on the step thread)."""
        return self.cache.used_slots / self.cache.num_slots

    def take_failures(self) -> list[tuple[str, str]]:
        """Requests that failed alone since the last call, with why: (request id, message)."""
        failures, self._failures = self._failures, []
        return failures

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Decode every running request by one token, then prefill prompts within the token budget.

        Returns:
            One :class:`StepOutput` per request that produced a token (finished ones carry finish_reason).
            Requests that failed alone are reported by :meth:`take_failures`.
        """
        self._take_incoming()
        outputs: list[StepOutput] = []
        running = list(self.scheduler.running)
        if running:
            # Slots 0..R-1 as views (and the CUDA graphs) when they are all running; with holes left by finished
            # requests, eager steps gather just the running slots rather than compute rows nobody reads.
            packed = self._graphs is not None or len(running) == self.cache.high_water()
            sampled = self._isolated(self._decode, running, packed=packed)
            outputs += self._consume([s for s, _ in sampled], [t for _, t in sampled])
        chunks = self.scheduler.schedule_prefill(len(running))
        if chunks:
            sampled = self._isolated(self._prefill, chunks)
            outputs += self._consume([s for s, _ in sampled], [t for _, t in sampled])
        self._drop_finished()
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.scheduler.running))
        return outputs

    def fail_all(self) -> list[str]:
        """Forget every running and waiting request (after an engine error); returns their ids."""
        with self._lock:
            seqs = [*self.scheduler.clear(), *self._incoming]
            self._incoming = []
            ids = list(dict.fromkeys(s.request_id for s in seqs))
            self._aborted.clear()
            self._known.difference_update(ids)
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Run ``prompts`` to completion (offline use, tests, benchmarks).

        Raises:
            EngineError: a request failed.
        """
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        outs: dict[str, list[StepOutput]] = {rid: [] for rid in ids}
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in outs:  # another caller's request sharing the engine
                    continue
                outs[out.request_id].append(out)
                if out.finish_reason is not None:
                    done[out.request_id] = gather_outputs(outs[out.request_id])
            failed = [(rid, why) for rid, why in self.take_failures() if rid in outs]
            if failed:
                for rid in ids:
                    if rid not in done:
                        self.abort_request(rid)
                self._take_incoming()  # the aborts take effect now, not at somebody's next step
                raise EngineError(f"request {failed[0][0]} failed: {failed[0][1]}")
        return [done[rid] for rid in ids]

    # ------------------------------------------------------------------ the forward passes
    def _eager_decode(self, tokens: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
                      attn_len: int) -> torch.Tensor:
        return self.forward.decode_logits(tokens, positions, write_pos, self.cache, attn_len)

    def warm_up(self) -> int:
        """Capture the decode step's CUDA graphs now, so that no request waits for a capture; returns how many
        (0 on CPU, or when capturing fails: decode steps then run eagerly)."""
        if self._graphs is None:
            return 0
        try:
            with torch.inference_mode():
                return self._graphs.warm_up()
        except GraphCaptureError as e:
            self._no_graphs(e)
            return 0

    def _no_graphs(self, error: Exception) -> None:
        logger.warning("[chatray serve] warning: %s; decode steps run eagerly from now on", error)
        self._graphs = None

    def _run_decode(self, inputs: torch.Tensor, attn_len: int) -> torch.Tensor:
        if self._graphs is not None:
            try:
                return self._graphs(inputs, attn_len)
            except GraphCaptureError as e:
                self._no_graphs(e)
        return self._eager_decode(inputs[0], inputs[1], inputs[2], attn_len)

    def _decode(self, seqs: list[Seq], packed: bool = False) -> list[tuple[Seq, int]]:
        """One token for each of ``seqs``. ``packed``: they are all the running sequences, and the step covers
        cache slots ``0..R-1`` as views (the CUDA-graph path); otherwise just their slots (a gather)."""
        attn_len = max(s.length for s in seqs)
        if packed:
            rows = self.cache.high_water()
            host = [[0] * rows, [0] * rows, [self.cache.scratch] * rows, [0] * rows]
            for s in seqs:
                host[0][s.slot], host[1][s.slot], host[2][s.slot] = s.output_ids[-1], s.length - 1, s.length - 1
                host[3][s.slot] = len(s.output_ids)
            inputs = torch.tensor(host, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self._run_decode(inputs[:3], attn_len)  # (rows, V)
            index: torch.Tensor | int = rows
            counters = inputs[3]
            picked = [s.slot for s in seqs]
        else:
            host = [[s.output_ids[-1] for s in seqs], [s.length - 1 for s in seqs], [len(s.output_ids) for s in seqs],
                    [s.slot for s in seqs]]
            inputs = torch.tensor(host, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self.forward.decode_logits(inputs[0], inputs[1], inputs[1], self.cache, attn_len, slots=inputs[3])
            index, counters, picked = inputs[3], inputs[2], None
        tokens = self._sample(logits, seqs, index, counters, picked)[1]
        return list(zip(seqs, tokens))

    def _prefill(self, chunks: list[Chunk]) -> list[tuple[Seq, int]]:
        """Write the chunks' prompt tokens to the cache; sample the first token of prompts that complete."""
        tokens: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        keep: list[int] = []  # indices (in the packed tokens) whose logits are needed
        for c in chunks:
            at = len(tokens)
            tokens += c.seq.prompt_ids[c.start:c.end]
            positions += range(c.start, c.end)
            token_slots += [c.seq.slot] * (c.end - c.start)
            if c.seq.params.prompt_logprobs is not None:
                keep += range(at, len(tokens))
            elif c.completes:
                keep.append(len(tokens) - 1)
        dev = self.device
        packed = torch.tensor([tokens, positions, token_slots], dtype=torch.long).to(dev)
        h = self.forward.prefill_hidden(packed[0], packed[1], packed[2],
                                        [(c.seq.slot, c.start, c.end) for c in chunks], self.cache)
        for c in chunks:
            self.scheduler.prefilled(c)
        if not keep:  # only partial prompts: nothing to score or sample yet
            return []
        logits = self.forward.logits(h.index_select(0, torch.tensor(keep, dtype=torch.long, device=dev)))
        done, last_rows, at = [], [], 0
        for c in chunks:
            m = c.end - c.start
            if c.seq.params.prompt_logprobs is not None:
                self._score_prompt(c, logits[at:at + m])
                at += m
                if c.completes:
                    done.append(c.seq)
                    last_rows.append(at - 1)
            elif c.completes:
                done.append(c.seq)
                last_rows.append(at)
                at += 1
        if not done:
            return []
        done_slots = torch.tensor([s.slot for s in done], dtype=torch.long).to(dev)
        self.slots.assign(done_slots, [s.params for s in done], [s.seed for s in done], [s.prompt_ids for s in done])
        counters = torch.zeros(len(done), dtype=torch.long, device=dev)
        last = logits.index_select(0, torch.tensor(last_rows, dtype=torch.long, device=dev))
        tokens_out = self._sample(last, done, done_slots, counters, None)[1]
        return list(zip(done, tokens_out))

    def _score_prompt(self, chunk: Chunk, logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens ``start + 1 .. end`` from the chunk's logits (the first token has none)."""
        seq, k = chunk.seq, chunk.seq.params.prompt_logprobs or 0
        targets = seq.prompt_ids[chunk.start + 1:chunk.end + 1]  # position j predicts token j + 1
        entries = [TokenLogprob(seq.prompt_ids[0], None)] if chunk.start == 0 else []
        if targets:
            entries += position_logprobs(logits[:len(targets)].float(),
                                         torch.tensor(targets, device=logits.device), k)
        # Entries for tokens 0..start exist already (none before the first chunk); a retried chunk replaces its own.
        seq.prompt_lps = (seq.prompt_lps or [])[:chunk.start + 1 if chunk.start else 0] + entries

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, rows: list[Seq], index: torch.Tensor | int, counters: torch.Tensor,
                picked: list[int] | None) -> tuple[torch.Tensor, list[int]]:
        """One token per sequence in ``rows``: (logits' rows, on the device) and as a list (the host round trip).

        Args:
            logits: (B, V) where B is ``len(rows)`` or, for a packed decode, the slots ``0..index-1``.
            index: the logits rows' slots (a tensor), or ``B`` for slots ``0..B-1``.
            counters: (B,) which token of its request each row draws (the seeded stream's position).
            picked: for a packed decode, the slot (logits row) of each sequence in ``rows``.
        """
        where = picked if picked is not None else list(range(len(rows)))
        want = [(i, r) for i, r in zip(where, rows) if r.params.logprobs is not None]
        if want:  # logprobs are the raw distribution: keep a copy of the logits before masking and penalties
            raw = logits.index_select(0, torch.tensor([i for i, _ in want], device=logits.device))
        plan = SamplerPlan.of([r.params for r in rows])
        state = self.slots.rows(index, plan)
        if self._vocab_limit is not None:  # ids past the tokenizer are never sampled: leave their columns out
            limit = self._vocab_limit
            logits = logits[:, :limit]
            state.update({k: state[k][:, :limit] for k in ("seen", "counts") if state[k] is not None})
        # Greedy rows take the argmax: their random numbers are never read.
        uniforms = counters if plan.all_greedy else seeded_uniforms(self.slots.seeds(index), counters)
        tokens = sample(logits, **state, uniforms=uniforms, plan=plan)
        host = tokens.tolist()  # the step's one wait for the device
        if want:
            k = max(r.params.logprobs or 0 for _, r in want)
            chosen = torch.tensor([host[i] for i, _ in want], device=logits.device)
            for (_, r), entry in zip(want, position_logprobs(raw, chosen, k)):
                r.step_logprob = TokenLogprob(entry.token_id, entry.logprob, entry.top[:r.params.logprobs])
        # Last, after everything that can fail: a step retried row by row (see _isolated) must not find its first
        # attempt's tokens in the history. A row with a penalty is in every step's plan while it runs, so its
        # history is never missing a token.
        self.slots.record(index, tokens, seen=plan.repetition, count=plan.presence_frequency)
        return tokens, [host[i] for i in where]

    # ------------------------------------------------------------------ bookkeeping
    def _isolated(self, fn: Callable[..., list[T]], items: list[Any], **kwargs: Any) -> list[T]:
        """``fn(items)``; if it raises, each item alone, so that only the failing request fails."""
        try:
            return fn(items, **kwargs)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the batch down
            if len(items) == 1:
                seq = items[0].seq if isinstance(items[0], Chunk) else items[0]
                logger.exception("request %s failed", seq.request_id)
                self._fail(seq, f"{type(e).__name__}: {e}")
                return []
            out: list[T] = []
            for item in items:
                out += self._isolated(fn, [item])
            return out

    def _fail(self, seq: Seq, why: str) -> None:
        self.scheduler.drop([seq])
        with self._lock:
            self._known.discard(seq.request_id)
        seq.finish_reason = "length"  # out of every list: nothing consumes it again
        self._failures.append((seq.request_id, why))
        self.stats["failed"] += 1

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborted, self._aborted = self._aborted, set()
            self._known.difference_update(aborted)
        self.scheduler.waiting.extend(incoming)
        if aborted:
            gone = [s for s in (*self.scheduler.waiting, *self.scheduler.holding_slots()) if s.request_id in aborted]
            self.scheduler.drop(gone)
            self.stats["aborted"] += len(gone)

    def _drop_finished(self) -> None:
        done = [s for s in self.scheduler.running if s.finish_reason is not None]
        if done:
            self.scheduler.drop(done)
            with self._lock:
                self._known.difference_update(s.request_id for s in done)

    def _consume(self, rows: list[Seq], tokens: list[int]) -> list[StepOutput]:
        outs = []
        for seq, tok in zip(rows, tokens):
            try:
                outs.append(self._consume_one(seq, tok))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer that cannot decode: this request only
                logger.exception("request %s failed", seq.request_id)
                self._fail(seq, f"{type(e).__name__}: {e}")
        return outs

    def _consume_one(self, seq: Seq, tok: int) -> StepOutput:
        out = seq.accept(tok, self.eos_token_ids, self.context_length)
        self.stats["generated_tokens"] += 1
        self.stats["finished"] += out.finish_reason is not None
        return out


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
