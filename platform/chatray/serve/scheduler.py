"""Who runs in the next step: first come, first served, by token budget, over the KV cache's slots.

Every step decodes every running sequence (one token each) and then spends what is left of
``max_num_batched_tokens`` on prompts: first those already being prefilled, then waiting ones, in arrival order,
each taking a slot of the KV cache as it starts. A prompt longer than what is left is cut into chunks and
finishes over several steps, so a long prompt never stalls the running sequences for a whole prefill. When no
slot is free, waiting requests wait; nothing is ever evicted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from chatray.serve.detokenize import Detokenizer
from chatray.serve.kvcache import KVCache
from chatray.serve.logprobs import TokenLogprob
from chatray.serve.outputs import FinishReason, StepOutput
from chatray.serve.sampling import SamplingParams

__all__ = ["Chunk", "Scheduler", "Sequence"]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine, from arrival to finish."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's 63-bit seed (see chatray.serve.sampling.new_seed)
    text: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    slot: int | None = None  # its KV-cache slot, from admission to finish
    prefilled: int = 0  # prompt tokens already in the cache
    step_logprob: TokenLogprob | None = None  # this step's token, until the engine hands it out
    prompt_lps: list[TokenLogprob] | None = None  # gathered chunk by chunk, handed out with the first output

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt and output)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def accept(self, token: int, eos_ids: frozenset[int], max_len: int) -> StepOutput:
        """Add a sampled token: detokenize, decide whether the sequence finishes, and say what to hand out.

        Args:
            token: the token sampled for this sequence.
            eos_ids: ids that end generation (unless the request ignores EOS).
            max_len: the most tokens (prompt + output) the sequence may reach.
        """
        self.output_ids.append(token)
        is_eos = token in eos_ids and not self.params.ignore_eos
        if is_eos or self.text.add(self.output_ids):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens or self.length >= max_len:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            # What the window still holds goes out at the end; it may complete a stop string. An EOS that ended
            # the request is counted but not decoded.
            text_ids = [i for i in self.output_ids if not (i in eos_ids and not self.params.ignore_eos)]
            if (is_eos or self.finish_reason == "length") and self.text.flush(text_ids):
                self.finish_reason = "stop"
        delta = self.text.take(final=self.finish_reason is not None)
        logprobs = (self.step_logprob,) if self.step_logprob is not None else ()
        prompt_lps = tuple(self.prompt_lps) if self.prompt_lps is not None else None
        out = StepOutput(self.request_id, delta, self.finish_reason, len(self.prompt_ids), len(self.output_ids),
                         logprobs, prompt_lps)
        self.step_logprob = self.prompt_lps = None
        return out


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens ``[start, end)`` of ``seq`` to prefill in this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def completes(self) -> bool:
        """Whether this chunk ends the prompt (its last position's logits give the first output token)."""
        return self.end == len(self.seq.prompt_ids)


class Scheduler:
    """The waiting queue, the sequences being prefilled and the running ones, over one :class:`KVCache`.

    Args:
        cache: the replica's KV cache (slots are taken and given back here).
        max_num_batched_tokens: tokens one step may process: decode tokens count first, prompts get the rest.
    """

    def __init__(self, cache: KVCache, max_num_batched_tokens: int) -> None:
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []

    def holding_slots(self) -> list[Sequence]:
        """Every sequence that owns a slot (being prefilled or running)."""
        return [*self.prefilling, *self.running]

    def schedule_prefill(self, decode_tokens: int) -> list[Chunk]:
        """The prompt chunks of this step, within the budget left after ``decode_tokens``."""
        budget = self.max_num_batched_tokens - decode_tokens
        chunks: list[Chunk] = []
        for seq in self.prefilling:
            if budget <= 0:
                return chunks
            chunks.append(self._chunk(seq, budget))
            budget -= chunks[-1].end - chunks[-1].start
        while budget > 0 and self.waiting and self.cache.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            self.prefilling.append(seq)
            chunks.append(self._chunk(seq, budget))
            budget -= chunks[-1].end - chunks[-1].start
        return chunks

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> Chunk:
        return Chunk(seq, seq.prefilled, min(len(seq.prompt_ids), seq.prefilled + budget))

    def prefilled(self, chunk: Chunk) -> None:
        """Record a chunk as written to the cache; a completed prompt moves its sequence to running."""
        seq = chunk.seq
        seq.prefilled = chunk.end
        if chunk.completes and seq in self.prefilling:
            self.prefilling.remove(seq)
            self.running.append(seq)

    def drop(self, seqs: list[Sequence]) -> None:
        """Remove sequences wherever they are and give their slots back."""
        gone = set(map(id, seqs))
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        self.prefilling = [s for s in self.prefilling if id(s) not in gone]
        self.running = [s for s in self.running if id(s) not in gone]
        for s in seqs:
            if s.slot is not None:
                self.cache.release(s.slot)
                s.slot = None

    def clear(self) -> list[Sequence]:
        """Forget every sequence (after an engine failure); returns them."""
        everyone = [*self.running, *self.prefilling, *self.waiting]
        self.waiting.clear()
        self.prefilling, self.running = [], []
        self.cache.release_all()
        for s in everyone:
            s.slot = None
        return everyone
