"""One request's ``n`` choices on the :class:`~chatray.serve.async_engine.AsyncEngine`, shaped for the ingress.

Each choice is its own engine request (its own seed), so the choices of one request are batched together like any
other requests. This module adds what OpenAI's APIs put around the generated text: completions' ``echo`` (the
prompt first, and with ``max_tokens: 0`` nothing else), logprobs in the shape of the request's API, choice
indices, and usage over all choices (the prompt counted once). Imports no Ray: unit tests drive it directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from chatray.serve.async_engine import AsyncEngine
from chatray.serve.logprobs import LogprobFormatter, TokenLogprob
from chatray.serve.outputs import Completion, StepOutput
from chatray.serve.prompting import RequestPlan
from chatray.serve.sampling import SamplingParams

__all__ = ["complete", "stream"]


class _Shaper:
    """Turns one choice's outputs, in order, into its text and logprobs (tracking completions' text_offset)."""

    def __init__(self, plan: RequestPlan, fmt: LogprobFormatter) -> None:
        self._plan, self._fmt = plan, fmt
        self._first = True
        self._offset = 0

    def shape(self, text: str, logprobs: Sequence[TokenLogprob],
              prompt_logprobs: Sequence[TokenLogprob] | None) -> tuple[str, Any]:
        plan, first = self._plan, self._first
        self._first = False
        entries: list[TokenLogprob] = []
        if first and plan.echo is not None:
            entries += prompt_logprobs or ()
            text = plan.echo + (text if plan.generate else "")
        elif not plan.generate:
            text = ""
        if plan.generate:
            entries += logprobs
        if plan.logprobs is None:
            return text, None
        if plan.kind == "chat":
            return text, self._fmt.chat(entries, plan.logprobs)
        shaped = self._fmt.completion(entries, plan.logprobs, self._offset)
        self._offset += sum(len(t) for t in shaped["tokens"])
        return text, shaped


async def complete(engine: AsyncEngine, plan: RequestPlan, fmt: LogprobFormatter) -> dict[str, Any]:
    """Run every choice to the end.

    Returns:
        ``{"choices": [{"text", "finish_reason", "logprobs"}], "prompt_tokens", "completion_tokens"}``.

    Raises:
        ValueError: the request does not fit the engine.
        EngineError: the engine failed.
    """
    tasks = [asyncio.ensure_future(engine.generate(plan.prompt_ids, p)) for p in plan.params]
    try:
        done: list[Completion] = await asyncio.gather(*tasks)
    except BaseException:  # one choice failed or the caller went away: the others stop too
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    choices = []
    for c in done:
        text, logprobs = _Shaper(plan, fmt).shape(c.text, c.logprobs, c.prompt_logprobs)
        choices.append({"text": text, "logprobs": logprobs,
                        "finish_reason": c.finish_reason if plan.generate else "length"})
    return {"choices": choices, "prompt_tokens": len(plan.prompt_ids),
            "completion_tokens": sum(c.completion_tokens for c in done) if plan.generate else 0}


async def stream(engine: AsyncEngine, plan: RequestPlan, fmt: LogprobFormatter) -> AsyncIterator[dict[str, Any]]:
    """Events of all choices, interleaved as they come: ``delta`` (``index``, ``text``, ``logprobs``) and
    ``finish`` (``index``, ``finish_reason``, ``completion_tokens``) per choice; closing it aborts them all.

    Raises:
        ValueError: the request does not fit the engine.
        EngineError: the engine failed.
    """
    streams = [_choice(engine, plan, fmt, i, p) for i, p in enumerate(plan.params)]
    merged = streams[0] if len(streams) == 1 else _merge(streams)  # n=1: no extra tasks on the hot path
    try:
        async for event in merged:
            yield event
    finally:
        await merged.aclose()


async def _choice(engine: AsyncEngine, plan: RequestPlan, fmt: LogprobFormatter, index: int,
                  params: SamplingParams) -> AsyncIterator[dict[str, Any]]:
    shaper = _Shaper(plan, fmt)
    outputs = engine.stream(plan.prompt_ids, params)
    try:
        async for out in outputs:
            delta = _delta(shaper, plan, out, index)
            if delta is not None:
                yield delta
            if out.finish_reason is not None:
                yield {"event": "finish", "index": index,
                       "finish_reason": out.finish_reason if plan.generate else "length",
                       "completion_tokens": out.completion_tokens if plan.generate else 0}
    finally:
        await outputs.aclose()


def _delta(shaper: _Shaper, plan: RequestPlan, out: StepOutput, index: int) -> dict[str, Any] | None:
    text, logprobs = shaper.shape(out.delta, out.logprobs, out.prompt_logprobs)
    if plan.kind == "completion" and logprobs is not None and not logprobs["tokens"]:
        logprobs = None
    if not text and not logprobs:  # a step whose text is held back (a possible stop string) and has no logprobs
        return None
    return {"event": "delta", "index": index, "text": text, "logprobs": logprobs}


async def _merge(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Items of several async iterators as they arrive; an error in one ends all."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(s: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for item in s:
                queue.put_nowait(item)
            queue.put_nowait(end)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(e)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
