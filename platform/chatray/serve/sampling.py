"""Per-request sampling parameters and the batched sampler.

Imports only torch (not Ray, not transformers): the engine calls :func:`sample` once per decode step with
one row per request, each row carrying its own temperature, top-k, top-p and penalties, so requests with
different settings share one forward pass.

Randomness is counter-based and computed on the device: the uniform number a request draws for its n-th token
is a hash of (its seed, n) (:func:`seeded_uniforms`), and the token is picked by inverse-CDF. A request therefore
gets the same random stream whichever requests it is batched with, on CPU or GPU alike, and drawing costs no
host round trip. What the batch needs (top-k, top-p, penalties) is decided on the host from the requests'
settings (:class:`SamplerPlan`), so the sampler itself never waits for the device either.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplerPlan", "SamplingParams", "new_seed", "sample", "seeded_uniforms"]

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


def new_seed(seed: int | None) -> int:
    """A request's 63-bit seed: ``seed`` folded into range (any Python int), or from OS entropy when None."""
    return (random.SystemRandom().getrandbits(63) if seed is None else seed) & 0x7FFF_FFFF_FFFF_FFFF


_M32 = 0xFFFF_FFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values below 2**32.

    Multipliers stay below 2**31, so products stay below 2**63: no signed overflow on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def seeded_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row, a pure function of (seed, counter): batch-invariant, on the device.

    Args:
        seeds: (B,) int64 in [0, 2**63), see :func:`new_seed`.
        counters: (B,) int64, the index of the token being drawn (0 for a request's first token).

    Returns:
        (B,) float32.
    """
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = _mix32(lo ^ _mix32(hi ^ _mix32((counters & _M32) ^ 0x9E3779B9)))
    h = _mix32(h ^ ((counters >> 32) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class SamplerPlan:
    """Which parts of :func:`sample` a batch needs, decided on the host from the rows' settings (no device sync).

    Attributes:
        all_greedy: every row has temperature 0.
        top_k: some row has top_k > 0.
        top_p: some row has top_p < 1.
        repetition: some row has a repetition penalty other than 1.
        presence_frequency: some row has a presence or frequency penalty.
        candidates: when every sampled (temperature > 0) row has a top_k, the largest: only that many candidates
            per row are ranked (a top-k instead of a sort of the whole vocabulary); 0 otherwise.
    """

    all_greedy: bool
    top_k: bool
    top_p: bool
    repetition: bool
    presence_frequency: bool
    candidates: int = 0

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SamplerPlan:
        sampled = [p for p in params if p.temperature > 0]
        return cls(all_greedy=not sampled, top_k=any(p.top_k > 0 for p in params),
                   top_p=any(p.top_p < 1.0 for p in params),
                   repetition=any(p.repetition_penalty != 1.0 for p in params),
                   presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
                   candidates=max(p.top_k for p in sampled) if sampled and all(p.top_k > 0 for p in sampled) else 0)


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
    plan: SamplerPlan | None = None,
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
        plan: what the batch needs, from the host; None works it out from the tensors (a device sync each).

    Returns:
        (B,) long token ids.
    """
    if plan is None:
        plan = SamplerPlan(all_greedy=bool((temperature <= 0).all()), top_k=bool((top_k > 0).any()),
                           top_p=bool((top_p < 1.0).any()), repetition=bool((repetition_penalty != 1.0).any()),
                           presence_frequency=presence_penalty is not None and frequency_penalty is not None and bool(
                               ((presence_penalty != 0) | (frequency_penalty != 0)).any()),
                           candidates=int(top_k.max()) if bool((top_k[temperature > 0] > 0).all()) else 0)
    logits = logits.float()
    if seen is not None and plan.repetition:
        pen = repetition_penalty[:, None]  # (B, 1)
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    if plan.presence_frequency and counts is not None and presence_penalty is not None \
            and frequency_penalty is not None:  # OpenAI's definition
        present = (counts > 0).to(logits.dtype)
        logits = logits - counts * frequency_penalty[:, None] - present * presence_penalty[:, None]
    greedy_tokens = logits.argmax(dim=-1)  # (B,)
    greedy = temperature <= 0
    if plan.all_greedy:
        return greedy_tokens
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if plan.top_k or plan.top_p:
        scaled = scaled.masked_fill(scaled < _keep_threshold(scaled, top_k, top_p, plan), float("-inf"))
    # The draw walks each row's kept tokens in vocabulary order: a row's token depends on its own logits and its
    # own random number, never on how the rest of the batch made the sampler rank.
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # (B, 1), below the total mass
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    return torch.where(greedy, greedy_tokens, picked)


def _keep_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, plan: SamplerPlan) -> torch.Tensor:
    """(B, 1): each row keeps the tokens whose scaled logit is at least this.

    Thresholds rather than positions in a ranking, so that tokens tied at the boundary are all kept (as
    transformers' top-k keeps them) and the kept set does not depend on the order a sort gives ties. Top-k is
    applied first, then top-p over the distribution top-k left (transformers' order).
    """
    vocab = scaled.shape[-1]
    if 0 < plan.candidates < vocab:  # tokens past every row's top_k are never kept: rank only the first ones
        ranked = scaled.topk(plan.candidates, dim=-1).values  # (B, C), descending
    else:
        ranked = scaled.sort(dim=-1, descending=True).values  # (B, V)
    width = ranked.shape[-1]
    threshold = torch.full_like(ranked[:, :1], float("-inf"))
    if plan.top_k:
        kth = ranked.gather(-1, (top_k.clamp(min=1, max=width) - 1)[:, None])
        threshold = torch.where(top_k[:, None] > 0, kth, threshold)
    if plan.top_p:
        kept = scaled.masked_fill(scaled < threshold, float("-inf"))
        log_total = torch.logsumexp(kept, dim=-1, keepdim=True)
        mass = (ranked - log_total).exp().masked_fill(ranked < threshold, 0.0).cumsum(dim=-1)  # (B, C or V)
        # The smallest set of best tokens whose mass reaches top_p ends at the first position where it does.
        last = (mass < top_p[:, None]).sum(dim=-1, keepdim=True).clamp(max=width - 1)
        cutoff = ranked.gather(-1, last)
        threshold = torch.where(top_p[:, None] < 1.0, torch.maximum(threshold, cutoff), threshold)
    return threshold
