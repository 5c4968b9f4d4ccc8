"""Per-request sampling parameters and the batched sampler.

Imports only torch (not Ray, not transformers): the engine calls :func:`sample` once per decode step with
one row per request, each row carrying its own temperature, top-k, top-p and penalties, so requests with
different settings share one forward pass.

Randomness comes from one ``torch.Generator`` per request (seeded by the request's ``seed``) that draws
one uniform number per step on the CPU; the token is then picked by inverse-CDF on the device. A request
therefore gets the same random stream whichever requests it is batched with, and on CPU or GPU alike.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "make_generator", "sample"]

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # alternatives per position, as vLLM's default max_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        max_tokens: generate at most this many tokens (EOS included when the model emits it).
        temperature: 0 is greedy (argmax); otherwise logits are divided by it. In [0, 2].
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. In (0, 1].
        top_k: keep only the k most likely tokens; 0 disables.
        repetition_penalty: HF/CTRL-style penalty on every token already in the prompt or output; 1 disables.
        presence_penalty: OpenAI's: subtracted from the logit of every token the output already holds. In [-2, 2].
        frequency_penalty: OpenAI's: subtracted once per earlier occurrence in the output. In [-2, 2].
        stop: strings that end generation; the text is cut just before the first one (not included).
        seed: seeds this request's random stream: same seed + same request = same output.
        ignore_eos: keep going past EOS (benchmarks use it to generate a fixed number of tokens).
        logprobs: report each generated token's log-probability and this many most likely alternatives
            (0: the token's only); None: none. In [0, 20].
        prompt_logprobs: the same for every prompt token after the first (scoring); None: none. In [0, 20].
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not _finite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded by ``seed`` (any int), or from OS entropy when None."""
    g = torch.Generator(device="cpu")
    # torch seeds are unsigned 64-bit; fold any Python int (negative, huge) into that range.
    g.manual_seed((random.SystemRandom().getrandbits(63) if seed is None else seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
    uniforms: torch.Tensor,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row, each row with its own settings.

    Args:
        logits: (B, V) next-token logits (any float dtype; computed in float32).
        temperature: (B,) float; 0 means greedy for that row.
        top_k: (B,) long; 0 disables.
        top_p: (B,) float in (0, 1]; 1 disables.
        repetition_penalty: (B,) float; 1 disables.
        uniforms: (B,) float in [0, 1): the row's random draw for this step.
        seen: (B, V) bool, tokens already in the row's prompt or output (for the repetition penalty).
        counts: (B, V) float, how often each token occurs in the row's output so far (for the next two).
        presence_penalty: (B,) float; 0 disables.
        frequency_penalty: (B,) float; 0 disables.

    Returns:
        (B,) long token ids.
    """
    logits = logits.float()
    if seen is not None and bool((repetition_penalty != 1.0).any()):
        pen = repetition_penalty[:, None]  # (B, 1)
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    logits = _presence_frequency(logits, counts, presence_penalty, frequency_penalty)
    greedy_tokens = logits.argmax(dim=-1)  # (B,)
    greedy = temperature <= 0
    if bool(greedy.all()):
        return greedy_tokens
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    vocab = scaled.shape[-1]
    need_k = bool((top_k > 0).any())
    need_p = bool((top_p < 1.0).any())
    if need_k or need_p:
        values, order = scaled.sort(dim=-1, descending=True)  # (B, V) each
        if need_k:
            k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
            ranks = torch.arange(vocab, device=values.device)[None, :]
            values = values.masked_fill(ranks >= k[:, None], float("-inf"))
        if need_p:
            probs = values.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of strictly better tokens
            p = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p)
            values = values.masked_fill(mass_before >= p[:, None], float("-inf"))
    else:
        values, order = scaled, None
    cdf = values.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # (B, 1), below the total mass
    pos = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)  # (B, 1)
    picked = (order.gather(-1, pos) if order is not None else pos).squeeze(-1)
    return torch.where(greedy, greedy_tokens, picked)


def _presence_frequency(logits: torch.Tensor, counts: torch.Tensor | None, presence: torch.Tensor | None,
                        frequency: torch.Tensor | None) -> torch.Tensor:
    """OpenAI's definition: ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``."""
    if counts is None or presence is None or frequency is None:
        return logits
    if not bool(((presence != 0) | (frequency != 0)).any()):  # the common case costs one check
        return logits
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]
