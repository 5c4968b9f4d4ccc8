"""Serving metrics without Ray: vLLM's names and buckets, and what the engine's steps record (a sink in a list)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

import pytest

from chatray.serve.async_engine import AsyncEngine
from chatray.serve.engine import GenerationEngine
from chatray.serve.metrics import FINISH_REASONS, SPECS, EngineMetrics
from chatray.serve.outputs import StepOutput
from chatray.serve.sampling import SamplingParams


class _Sink:
    """Records what EngineMetrics writes, as the Ray sink would export it."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()
        self.gauges: dict[str, float] = {}
        self.observed: dict[str, list[float]] = defaultdict(list)

    def inc(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self.counters[(name, *sorted((tags or {}).items()))] += value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        self.observed[name].append(value)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_names_types_and_buckets_are_vllms_with_chatrays_prefix():
    exported = {name: spec.exported for name, spec in SPECS.items()}
    assert exported["time_to_first_token_seconds"] == "ray_chatray_time_to_first_token_seconds"
    assert exported["prompt_tokens"] == "ray_chatray_prompt_tokens_total"  # Ray adds _total to counters
    assert exported["request_success"] == "ray_chatray_request_success_total"
    assert {n for n, s in SPECS.items() if s.kind == "gauge"} == {
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"}
    assert {n for n, s in SPECS.items() if s.kind == "histogram"} == {
        "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
        "request_queue_time_seconds"}
    # vllm/v1/metrics/loggers.py
    assert SPECS["time_to_first_token_seconds"].buckets[:3] == (0.001, 0.005, 0.01)
    assert SPECS["time_to_first_token_seconds"].buckets[-1] == 2560.0
    assert SPECS["inter_token_latency_seconds"].buckets[0] == 0.01
    assert SPECS["inter_token_latency_seconds"].buckets[-1] == 80.0
    assert SPECS["e2e_request_latency_seconds"].buckets == SPECS["request_queue_time_seconds"].buckets
    assert SPECS["e2e_request_latency_seconds"].buckets[-1] == 7680.0
    assert SPECS["request_success"].labels == ("model_name", "finished_reason")
    for spec in SPECS.values():
        assert spec.labels[0] == "model_name"
        assert list(spec.buckets) == sorted(set(spec.buckets))


def _out(rid: str, n: int, finish: str | None = None, prompt: int = 4) -> StepOutput:
    return StepOutput(rid, "x", finish, prompt, n)  # type: ignore[arg-type]


def test_one_request_s_timings_from_arrival_to_its_last_token():
    sink, clock = _Sink(), _Clock()
    m = EngineMetrics(sink, clock)
    m.arrived("a")  # t=100
    clock.now = 100.5
    started = clock.now  # admitted by the step that begins at 100.5
    clock.now = 100.75
    m.step(started, [_out("a", 1)], running=1, waiting=0, kv_cache_usage=0.25)
    clock.now = 101.0
    m.step(100.8, [_out("a", 2)], running=1, waiting=0, kv_cache_usage=0.25)
    clock.now = 101.5
    m.step(101.1, [_out("a", 3, "length")], running=0, waiting=0, kv_cache_usage=0.0)
    assert sink.observed["time_to_first_token_seconds"] == [0.75]
    assert sink.observed["request_queue_time_seconds"] == [0.5]
    assert sink.observed["inter_token_latency_seconds"] == [0.25, 0.5]
    assert sink.observed["e2e_request_latency_seconds"] == [1.5]
    assert sink.counters[("generation_tokens",)] == 3 and sink.counters[("prompt_tokens",)] == 4
    assert sink.counters[("request_success", ("finished_reason", "length"))] == 1
    assert sink.gauges == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0}


def test_aborted_refused_and_failed_requests_are_told_apart():
    sink = _Sink()
    m = EngineMetrics(sink, _Clock())
    for rid in ("gone", "refused", "x", "y"):
        m.arrived(rid)
    m.step(100.0, [_out("gone", 1), _out("x", 1), _out("y", 1)], running=3, waiting=2, kv_cache_usage=0.5)
    assert sink.gauges == {"num_requests_running": 3, "num_requests_waiting": 2, "kv_cache_usage_perc": 0.5}
    m.forget("refused")  # the engine refused it: it counts nowhere
    m.aborted("gone")
    m.aborted("gone")  # once only
    m.failed(["x", "y", "unknown"])
    m.step(100.0, [_out("gone", 2)], running=0, waiting=0, kv_cache_usage=0.0)  # a token already under way
    assert sink.counters[("request_success", ("finished_reason", "abort"))] == 1
    assert sink.counters[("request_success", ("finished_reason", "error"))] == 2
    assert sum(v for k, v in sink.counters.items() if k[0] == "request_success") == 3
    assert sink.counters[("generation_tokens",)] == 4  # every generated token counts, tracked or not
    assert sink.counters[("prompt_tokens",)] == 12
    assert "e2e_request_latency_seconds" not in sink.observed and len(sink.observed["time_to_first_token_seconds"]) == 3
    assert set(FINISH_REASONS) == {"stop", "length", "abort", "error"}


def test_async_engine_records_exactly_what_it_generated(tiny_model):
    """The real engine and step loop: counts equal the completions', one TTFT per request, one gap per later token."""
    model, tok = tiny_model
    sink = _Sink()

    async def main():
        core = GenerationEngine(model, tok, max_batch_size=2, eos_token_ids=[])
        engine = AsyncEngine(core, batch_wait_timeout_s=0.0, step_delay_s=0.0, metrics=EngineMetrics(sink))
        try:
            prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]  # 4 requests, batches of 2: two of them wait
            done = await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=m, temperature=0.0))
                                          for p, m in zip(prompts, (3, 5, 2, 4))))
            with pytest.raises(ValueError, match="exceeds"):  # refused by the engine: not a request it ran
                await engine.generate([1] * 120, SamplingParams(max_tokens=50))
            return done
        finally:
            engine.shutdown()

    done = asyncio.run(main())
    generated = sum(c.completion_tokens for c in done)
    assert generated == 14
    assert sink.counters[("generation_tokens",)] == generated
    assert sink.counters[("prompt_tokens",)] == 10
    assert sink.counters[("request_success", ("finished_reason", "length"))] == 4
    assert sum(v for k, v in sink.counters.items() if k[0] == "request_success") == 4
    assert len(sink.observed["time_to_first_token_seconds"]) == len(sink.observed["e2e_request_latency_seconds"]) == 4
    assert len(sink.observed["inter_token_latency_seconds"]) == generated - 4
    assert max(sink.observed["request_queue_time_seconds"]) > 0  # two requests waited for a free row
    ttft = sorted(sink.observed["time_to_first_token_seconds"])
    e2e = sorted(sink.observed["e2e_request_latency_seconds"])
    assert all(t > 0 for t in ttft) and ttft[-1] <= e2e[-1]
    assert sink.gauges["num_requests_running"] == 0 and sink.gauges["kv_cache_usage_perc"] == 0.0


def test_kv_cache_usage_is_the_share_of_slots_requests_hold(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=4, max_model_len=64, eos_token_ids=[])
    assert engine.kv_cache_usage() == 0.0
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0))
    engine.add_request("b", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0))
    engine.step()  # both admitted: each owns one slot of max_model_len positions until it finishes
    assert engine.kv_cache_usage() == pytest.approx(2 / 4)
    for _ in range(5):
        engine.step()
    assert engine.kv_cache_usage() == pytest.approx(1 / 4)  # "a" finished (5 tokens): its slot is free again
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_cache_usage() == 0.0
