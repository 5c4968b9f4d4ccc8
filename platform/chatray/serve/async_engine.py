"""The thread bridge between the synchronous engine and asyncio: what the Serve replica awaits.

:class:`AsyncEngine` runs :meth:`GenerationEngine.step` in a loop on a background thread, because a step blocks
(a forward pass) while the replica's event loop must stay free to accept and stream other requests. Each
request gets an async iterator of :class:`StepOutput`; outputs cross threads with ``call_soon_threadsafe`` onto
the asyncio queue of the request's own event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from chatray.serve.engine import GenerationEngine
from chatray.serve.metrics import EngineMetrics
from chatray.serve.outputs import Completion, EngineError, StepOutput, gather_outputs
from chatray.serve.sampling import SamplingParams

__all__ = ["AsyncEngine"]

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Runs a :class:`GenerationEngine` step loop in a background thread; requests are async iterators.

    Args:
        engine: the synchronous engine.
        batch_wait_timeout_s: when the engine is idle and a request arrives, wait this long for others to
            arrive so that they are prefilled together (later arrivals join the running batch anyway).
        step_delay_s: sleep after every step. Testing only: makes timing-dependent tests deterministic.
        metrics: where requests' timings and the steps' counts go (None: nowhere).
    """

    def __init__(self, engine: GenerationEngine, *, batch_wait_timeout_s: float, step_delay_s: float,
                 metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self._metrics = metrics
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.step_delay_s = step_delay_s
        # request id -> (its event loop, its queue, outputs gathered here for whole-reply requests or None)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[StepOutput] | None]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="chatray-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the step loop thread is running."""
        return self._thread.is_alive() and not self._stop.is_set()

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     request_id: str | None = None, *, whole: bool = False) -> AsyncIterator[StepOutput]:
        """Generate for one request, yielding a :class:`StepOutput` per step until one has finish_reason.

        With ``whole``, the step loop gathers the outputs itself and yields only the final one, whose delta (and
        logprobs) are the whole reply's: one hand-over between threads per request instead of one per token.
        Closing the iterator early (client gone, task cancelled) aborts the request in the engine.

        Raises:
            ValueError: the request does not fit (see :meth:`GenerationEngine.add_request`).
            EngineError: the engine failed while the request ran.
        """
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            self._streams[rid] = (asyncio.get_running_loop(), queue, [] if whole else None)
        finished = queued = False
        try:
            if self._metrics is not None:
                self._metrics.arrived(rid)
            self.engine.add_request(rid, prompt_ids, params)
            queued = True
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
            if not finished:
                self.engine.abort_request(rid)
                self._wake.set()
            if self._metrics is not None and not finished:  # a refused request never ran: it counts nowhere
                (self._metrics.aborted if queued else self._metrics.forget)(rid)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion:
        """Generate for one request and return the whole :class:`Completion`."""
        agen = self.stream(prompt_ids, params, request_id, whole=True)
        try:
            async for out in agen:
                if out.finish_reason is not None:
                    return Completion(out.request_id, out.delta, out.finish_reason, out.prompt_tokens,
                                      out.completion_tokens, out.logprobs, out.prompt_logprobs)
        finally:
            await agen.aclose()
        raise EngineError("generation ended without a finish reason")  # pragma: no cover

    def stats(self) -> dict[str, Any]:
        """Counters plus the current number of running and waiting requests."""
        return {**self.engine.stats, "running": self.engine.num_running(), "waiting": self.engine.num_waiting(),
                "alive": self.alive, "last_error": self.last_error}

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the step loop thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _deliver(self, rid: str, item: StepOutput | BaseException) -> None:
        self._deliver_many([(rid, item)])

    def _deliver_many(self, items: list[tuple[str, StepOutput | BaseException]]) -> None:
        """Hand a step's outputs over: one wake-up per event loop per step, not one per token (each wake-up is a
        write to the loop's self-pipe and a fight for the GIL with this thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, Any]]] = {}
        with self._streams_lock:
            targets = [(rid, item, self._streams.get(rid)) for rid, item in items]
        for rid, item, target in targets:
            if target is None:
                continue
            loop, queue, parts = target
            if parts is not None and isinstance(item, StepOutput):  # whole-reply request: hand over only the end
                parts.append(item)
                if item.finish_reason is None:
                    continue
                whole = gather_outputs(parts)
                item = replace(item, delta=whole.text, logprobs=whole.logprobs, prompt_logprobs=whole.prompt_logprobs)
            by_loop.setdefault(loop, []).append((rid, queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the requests' event loop is closed: nobody is listening any more
                for rid, _, _ in batch:
                    self.engine.abort_request(rid)

    def _deliver_failures(self) -> None:
        """Requests that failed alone (the rest of the batch went on) get their error."""
        failures = self.engine.take_failures()
        if not failures:
            return
        if self._metrics is not None:
            self._metrics.failed([rid for rid, _ in failures])
        for rid, why in failures:
            self.last_error = why
            self._deliver(rid, EngineError(f"generation failed: {why}"))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                if self._metrics is not None:
                    self._metrics.idle()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            if self.engine.num_running() == 0 and self.batch_wait_timeout_s > 0:
                time.sleep(self.batch_wait_timeout_s)  # gather a burst of arrivals into one prefill
            started = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the in-flight requests, keep serving
                logger.exception("engine step failed")
                self.last_error = f"{type(e).__name__}: {e}"
                err = EngineError(f"generation failed: {type(e).__name__}: {e}")
                failed = self.engine.fail_all()
                if self._metrics is not None:
                    self._metrics.failed(failed)
                for rid in failed:
                    self._deliver(rid, err)
                continue
            if self._metrics is not None:
                self._metrics.step(started, outputs, self.engine.num_running(), self.engine.num_waiting(),
                                   self.engine.kv_cache_usage())
            self._deliver_many([(out.request_id, out) for out in outputs])
            self._deliver_failures()
            if self.step_delay_s > 0:
                time.sleep(self.step_delay_s)


def _put_all(batch: list[tuple[str, asyncio.Queue, Any]]) -> None:
    for _, queue, item in batch:
        queue.put_nowait(item)
