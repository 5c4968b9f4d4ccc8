"""Serving metrics through Ray's metrics system: vLLM's series, with ``chatray`` in place of ``vllm``.

Each series is a ``ray.serve.metrics`` Counter, Gauge or Histogram created in a Serve replica, so Ray's metrics
agent exports it on every node's metrics export port next to Serve's own series (no second HTTP server), and Serve
adds its ``deployment``, ``replica`` and ``application`` labels to every sample. chatray adds ``model_name``
(vLLM's label). Names, types and histogram buckets are vLLM's (``vllm/v1/metrics/loggers.py``); two things differ:

* the prefix is ``chatray_``, not ``chatray:``: Ray's OpenTelemetry exporter drops names with ``:`` (vLLM's own
  Ray integration turns ``vllm:`` into ``vllm_`` the same way);
* Ray's agent prefixes every application metric with ``ray_`` and, like Prometheus clients, adds ``_total`` to a
  counter's name: ``time_to_first_token_seconds`` is scraped as ``ray_chatray_time_to_first_token_seconds_bucket``
  and ``prompt_tokens`` as ``ray_chatray_prompt_tokens_total`` (:attr:`MetricSpec.exported`).

Generator replicas record the engine's facts through :class:`EngineMetrics` (timing per request, counts per step);
the ingress counts rejected requests (:func:`rejection_counter`). Ray is imported only where series are created
(:func:`ray_sink`), so unit tests drive :class:`EngineMetrics` with a sink of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:  # the engine imports torch: the ingress, which imports this module, must not
    from chatray.serve.outputs import StepOutput

__all__ = [
    "EXPORT_PREFIX", "FINISH_REASONS", "PREFIX", "SPECS", "EngineMetrics", "MetricSpec", "Sink", "ray_sink",
    "rejection_counter",
]

PREFIX = "chatray_"
EXPORT_PREFIX = "ray_"  # what Ray's metrics agent puts in front of every application metric

# vLLM's buckets (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0)

# request_success's finished_reason: the engine's two, "abort" (the client went away; vLLM's name) and "error" (the
# engine failed while the request ran).
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class MetricSpec:
    """One series: its name without prefix, type, help text, chatray's labels and histogram buckets."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    labels: tuple[str, ...] = ("model_name",)
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name on Ray's metrics endpoint (a histogram's samples add ``_bucket``, ``_sum``, ``_count``)."""
        return f"{EXPORT_PREFIX}{PREFIX}{self.name}{'_total' if self.kind == 'counter' else ''}"


SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
               buckets=_TTFT_BUCKETS),
    MetricSpec("inter_token_latency_seconds", "histogram", "Histogram of inter-token latency in seconds.",
               buckets=_ITL_BUCKETS),
    MetricSpec("e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.",
               buckets=_REQUEST_LATENCY_BUCKETS),
    MetricSpec("request_queue_time_seconds", "histogram",
               "Histogram of time spent in WAITING phase for request.", buckets=_REQUEST_LATENCY_BUCKETS),
    MetricSpec("num_requests_running", "gauge", "Number of requests in model execution batches."),
    MetricSpec("num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    MetricSpec("kv_cache_usage_perc", "gauge",
               "KV-cache usage: slots held by requests / slots allocated. 1 means 100 percent usage."),
    MetricSpec("prompt_tokens", "counter", "Number of prefill tokens processed."),
    MetricSpec("generation_tokens", "counter", "Number of generation tokens processed."),
    MetricSpec("request_success", "counter", "Count of successfully processed requests.",
               labels=("model_name", "finished_reason")),
    MetricSpec("request_rejected", "counter",
               "Requests the HTTP ingress answered with an error status (400, 401, 408, 413, 429, 503), by reason.",
               labels=("model_name", "status", "reason")),
)}


class Sink(Protocol):
    """Where :class:`EngineMetrics` writes: by series name (without prefix), tags beyond ``model_name``."""

    def inc(self, name: str, value: float, tags: dict[str, str] | None = None) -> None: ...
    def set(self, name: str, value: float) -> None: ...
    def observe(self, name: str, value: float) -> None: ...


class EngineMetrics:
    """Turns the engine's step outputs into vLLM's series, for one replica.

    Called from two threads: :meth:`arrived`, :meth:`forget` and :meth:`aborted` on the replica's event loop,
    :meth:`step`, :meth:`failed` and :meth:`idle` on the engine's step thread. They share one dict and touch only
    single keys (``get``, ``pop``, item assignment), which the GIL makes atomic: no lock on the decode path.

    Args:
        sink: where the values go (:func:`ray_sink` in a replica).
        clock: seconds, monotonic (``time.perf_counter``).
    """

    def __init__(self, sink: Sink, clock: Callable[[], float] = time.perf_counter) -> None:
        self._sink = sink
        self._clock = clock
        # request id -> [arrival, time of its latest token or None before the first]
        self._requests: dict[str, list[float | None]] = {}

    def arrived(self, request_id: str) -> None:
        """A request is about to be queued in the engine: its clock starts now."""
        self._requests[request_id] = [self._clock(), None]

    def forget(self, request_id: str) -> None:
        """The engine refused the request (it never ran): it counts nowhere."""
        self._requests.pop(request_id, None)

    def aborted(self, request_id: str) -> None:
        """The request left before it finished (client gone): ``request_success{finished_reason="abort"}``."""
        if self._requests.pop(request_id, None) is not None:
            self._sink.inc("request_success", 1, {"finished_reason": "abort"})

    def failed(self, request_ids: Iterable[str]) -> None:
        """The engine failed while these ran: ``request_success{finished_reason="error"}``."""
        n = sum(self._requests.pop(rid, None) is not None for rid in request_ids)
        if n:
            self._sink.inc("request_success", n, {"finished_reason": "error"})

    def step(self, started: float, outputs: Sequence[StepOutput], running: int, waiting: int,
             kv_cache_usage: float) -> None:
        """One engine step's outputs (one new token each), and the batch after it.

        Args:
            started: ``clock()`` when the step began: a request whose first token this step made was admitted then,
                so its queue time is ``started - arrival``.
            outputs: the step's outputs.
            running: requests in the batch now; waiting: requests queued now.
            kv_cache_usage: fraction of the KV cache's capacity in use now.
        """
        now, sink, prompt_tokens = self._clock(), self._sink, 0
        for out in outputs:
            first = out.completion_tokens == 1
            if first:
                prompt_tokens += out.prompt_tokens
            state = self._requests.get(out.request_id)
            if state is None:  # not tracked (forgotten or already counted): its tokens still count
                continue
            arrival, last = state
            if first:
                sink.observe("time_to_first_token_seconds", now - arrival)
                sink.observe("request_queue_time_seconds", max(0.0, started - arrival))
            elif last is not None:
                # Every row of a batch gets its token at the same moment: one gap per token, as vLLM counts them.
                sink.observe("inter_token_latency_seconds", now - last)
            state[1] = now
            if out.finish_reason is not None:
                del self._requests[out.request_id]
                sink.observe("e2e_request_latency_seconds", now - arrival)
                sink.inc("request_success", 1, {"finished_reason": out.finish_reason})
        if outputs:
            sink.inc("generation_tokens", len(outputs))
        if prompt_tokens:
            sink.inc("prompt_tokens", prompt_tokens)
        self.idle(running, waiting, kv_cache_usage)

    def idle(self, running: int = 0, waiting: int = 0, kv_cache_usage: float = 0.0) -> None:
        """Set the gauges (also while idle: Ray drops a gauge that is not reported for two intervals)."""
        self._sink.set("num_requests_running", running)
        self._sink.set("num_requests_waiting", waiting)
        self._sink.set("kv_cache_usage_perc", kv_cache_usage)


class _RaySink:
    """:class:`Sink` over ``ray.serve.metrics`` series (Serve adds deployment, replica and application)."""

    def __init__(self, model_name: str, names: Sequence[str]) -> None:
        from ray.serve import metrics

        kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}
        self._series = {}
        for name in names:
            spec = SPECS[name]
            kwargs = {"boundaries": list(spec.buckets)} if spec.kind == "histogram" else {}
            series = kinds[spec.kind](PREFIX + name, description=spec.description, tag_keys=spec.labels, **kwargs)
            series.set_default_tags({"model_name": model_name})
            self._series[name] = series

    def inc(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self._series[name].inc(value, tags)

    def set(self, name: str, value: float) -> None:
        self._series[name].set(value)

    def observe(self, name: str, value: float) -> None:
        self._series[name].observe(value)


def ray_sink(model_name: str) -> Sink:
    """The engine's series (every one in :data:`SPECS` but ``request_rejected``), created in this Serve replica.

    Args:
        model_name: the served model's id (``/v1/models``), the ``model_name`` label.

    Returns:
        A :class:`Sink` for :class:`EngineMetrics`.
    """
    return _RaySink(model_name, [n for n in SPECS if n != "request_rejected"])


def rejection_counter(model_name: str) -> Callable[[int, str], None]:
    """``request_rejected{status, reason}``, created in this Serve replica (the ingress).

    Args:
        model_name: the served model's id, the ``model_name`` label.

    Returns:
        ``count(status, reason)``: one rejected request; ``reason`` is the error's code (or its type).
    """
    sink = _RaySink(model_name, ["request_rejected"])

    def count(status: int, reason: str) -> None:
        sink.inc("request_rejected", 1, {"status": str(status), "reason": reason})

    return count
