"""The generation core: continuous batching equals one-at-a-time greedy decoding, exact stops and counts."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from support.generation import hf_greedy, spy_token_ids

from chatray.serve.app import ServeArgs
from chatray.serve.async_engine import AsyncEngine
from chatray.serve.engine import GenerationEngine
from chatray.serve.sampling import SamplingParams

BATCH = ServeArgs().max_batch_size  # the batch size a replica gets unless serve_config.yaml says otherwise


def _run(engine: GenerationEngine, schedule: list[tuple[str, list[int], SamplingParams]], joins_per_step: int = 1):
    """Add requests a few per step (so they join a running batch); collect outputs per request."""
    pending, outs = list(schedule), {rid: [] for rid, _, _ in schedule}
    while pending or engine.has_unfinished():
        for _ in range(joins_per_step):
            if pending:
                engine.add_request(*pending.pop(0))
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


def _force(engine: GenerationEngine, script: dict[str, list[int]]) -> None:
    """Make the engine emit scripted tokens (the forward pass still runs; only the choice is replaced)."""
    def fake_sample(logits, rows, *args):
        tokens = [script[s.request_id].pop(0) for s in rows]
        return torch.tensor(tokens, dtype=torch.long), tokens

    engine._sample = fake_sample


def test_continuous_batching_matches_one_at_a_time_greedy(tiny_model):
    model, tok = tiny_model
    rng = random.Random(0)
    prompts = [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))] for _ in range(9)]
    lengths = [rng.randint(1, 25) for _ in prompts]
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    captured = spy_token_ids(engine)
    schedule = [(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0)) for i, (p, n) in
                enumerate(zip(prompts, lengths))]
    outs = _run(engine, schedule, joins_per_step=2)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert captured[f"r{i}"] == hf_greedy(model, p, n), f"request {i} diverged"
        last = outs[f"r{i}"][-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", len(p), n)
    assert engine.stats["max_batch_seen"] == 4
    assert not engine.has_unfinished() and engine.num_running() == 0


def test_stop_string_is_cut_exactly_and_never_streamed(tiny_model):
    model, tok = tiny_model
    text = "I am fine, thank you. 你好, bye"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[])
    _force(engine, {"a": list(ids), "b": list(ids), "c": list(ids)})
    schedule = [("a", [1, 2], SamplingParams(max_tokens=len(ids), stop=("thank",))),
                ("b", [3], SamplingParams(max_tokens=len(ids), stop=("nothing-like-this", ", b"))),
                ("c", [4], SamplingParams(max_tokens=len(ids), stop=("好",)))]
    outs = _run(engine, schedule, joins_per_step=3)
    expect = {"a": "I am fine, ", "b": "I am fine, thank you. 你好", "c": "I am fine, thank you. 你"}
    for rid, want in expect.items():
        streamed = "".join(o.delta for o in outs[rid])
        assert streamed == want
        assert outs[rid][-1].finish_reason == "stop"
        assert all(o.finish_reason is None for o in outs[rid][:-1])
    # the token that completed "thank" is counted: usage is what the model generated
    assert outs["a"][-1].completion_tokens == len(tok("I am fine, thank", add_special_tokens=False)["input_ids"])


def test_unicode_is_streamed_whole_characters(tiny_model):
    model, tok = tiny_model
    text = "我喜欢游泳和跑步。你喜欢什么运动?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[])
    _force(engine, {"u": list(ids)})
    outs = _run(engine, [("u", [5], SamplingParams(max_tokens=len(ids)))])["u"]
    assert "".join(o.delta for o in outs) == text
    assert not any("\ufffd" in o.delta for o in outs)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == len(ids)


def test_eos_stops_and_is_not_in_the_text(tiny_model):
    model, tok = tiny_model
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(model, tok, max_batch_size=BATCH)
    _force(engine, {"e": [*ids, tok.eos_token_id, *ids]})
    outs = _run(engine, [("e", [7], SamplingParams(max_tokens=20))])["e"]
    assert "".join(o.delta for o in outs) == "hello there"
    assert outs[-1].finish_reason == "stop" and outs[-1].completion_tokens == len(ids) + 1
    # ignore_eos keeps going (benchmarks): the EOS is skipped in the text, generation continues
    engine2 = GenerationEngine(model, tok, max_batch_size=BATCH)
    _force(engine2, {"e": [*ids, tok.eos_token_id, *ids]})
    outs2 = _run(engine2, [("e", [7], SamplingParams(max_tokens=2 * len(ids) + 1, ignore_eos=True))])["e"]
    assert outs2[-1].finish_reason == "length" and outs2[-1].completion_tokens == 2 * len(ids) + 1


def test_seed_reproducible_whatever_the_batch(tiny_model):
    model, tok = tiny_model
    prompt = tok("hello, how are you?", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    alone = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]).generate([prompt], params)[0]
    rng = random.Random(1)
    others = [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    mixed = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]).generate(
        [others[0], prompt, others[1], others[2]],
        [SamplingParams(max_tokens=5, temperature=0.0), params, SamplingParams(max_tokens=40, temperature=1.5),
         SamplingParams(max_tokens=12, top_k=3, repetition_penalty=1.3)])
    assert mixed[1].text == alone.text
    other_seed = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]).generate(
        [prompt], SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=99))[0]
    assert other_seed.text != alone.text


def test_abort_leaves_the_batch(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[])
    engine.add_request("keep", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    engine.add_request("drop", [4, 5], SamplingParams(max_tokens=50, temperature=0.0))
    engine.add_request("queued", [6], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.abort_request("drop")
    engine.abort_request("unknown-id")  # ignored
    outs = engine.step()
    assert {o.request_id for o in outs} == {"keep", "queued"}
    engine.abort_request("keep")
    engine.abort_request("queued")
    engine.step()
    assert engine.num_running() == 0 and not engine.has_unfinished()
    assert engine.stats["aborted"] == 3


def test_request_that_does_not_fit_is_refused(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=BATCH)
    with pytest.raises(ValueError, match=r"prompt \(100 tokens\) \+ max_tokens \(29\) = 129 .* context of 128"):
        engine.add_request("x", [1] * 100, SamplingParams(max_tokens=29))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("z", [len(tok) + 10_000], SamplingParams())


def test_padded_vocabulary_is_never_sampled(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=len(tok) + 64))
    engine = GenerationEngine(model.eval(), tok, max_batch_size=BATCH, eos_token_ids=[])
    got = spy_token_ids(engine)
    engine.generate([[1, 2]] * 4, SamplingParams(max_tokens=40, temperature=2.0, seed=0))
    seen = [t for ids in got.values() for t in ids]
    assert len(seen) == 160 and max(seen) < len(tok)


def test_async_engine_streams_and_cancels(tiny_model):
    model, tok = tiny_model

    async def main():
        engine = AsyncEngine(GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]),
                             batch_wait_timeout_s=0.005, step_delay_s=0.005)
        try:
            prompts = [[1, 2, 3], [4], [5, 6]]
            results = await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=10, temperature=0.0))
                                             for p in prompts))
            expected = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]).generate(
                prompts, SamplingParams(max_tokens=10, temperature=0.0))
            assert [r.text for r in results] == [e.text for e in expected]
            # a consumer that goes away mid-stream frees the batch slot
            agen = engine.stream([1, 2], SamplingParams(max_tokens=100, temperature=0.0))
            n = 0
            async for _ in agen:
                n += 1
                if n == 3:
                    break
            await agen.aclose()
            for _ in range(200):
                if engine.stats()["running"] == 0 and engine.stats()["aborted"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats()["running"] == 0 and engine.stats()["aborted"] == 1
            with pytest.raises(ValueError, match="exceeds"):
                await engine.generate([1] * 120, SamplingParams(max_tokens=50))
            assert engine.alive
        finally:
            engine.shutdown()
        assert not engine.alive

    asyncio.run(main())


def test_whole_reply_crosses_threads_once_and_cancels(tiny_model):
    """A non-streaming request gets one hand-over with the whole text; cancelling it aborts the generation."""
    model, tok = tiny_model

    async def main():
        engine = AsyncEngine(GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[]),
                             batch_wait_timeout_s=0.005, step_delay_s=0.002)
        try:
            params = SamplingParams(max_tokens=12, temperature=0.0)
            streamed = [o async for o in engine.stream([7, 8, 9], params)]
            whole = [o async for o in engine.stream([7, 8, 9], params, whole=True)]
            assert len(streamed) == 12 and len(whole) == 1
            assert whole[0].delta == "".join(o.delta for o in streamed) and whole[0].completion_tokens == 12
            task = asyncio.create_task(engine.generate([1, 2], SamplingParams(max_tokens=100, temperature=0.0)))
            for _ in range(200):
                if engine.stats()["running"] == 1:
                    break
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if engine.stats()["running"] == 0 and engine.stats()["aborted"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats()["running"] == 0 and engine.stats()["aborted"] == 1
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_engine_failure_fails_requests_instead_of_hanging(tiny_model):
    from chatray.serve.outputs import EngineError

    model, tok = tiny_model

    async def main():
        core = GenerationEngine(model, tok, max_batch_size=BATCH, eos_token_ids=[])
        engine = AsyncEngine(core, batch_wait_timeout_s=0.005, step_delay_s=0.0)
        real = core._prefill
        calls = {"n": 0}

        def flaky(rows):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated out of memory")
            return real(rows)

        core._prefill = flaky
        try:
            with pytest.raises(EngineError, match="simulated out of memory"):
                await asyncio.wait_for(engine.generate([1, 2], SamplingParams(max_tokens=5)), 10)
            ok = await asyncio.wait_for(engine.generate([1, 2], SamplingParams(max_tokens=5)), 10)
            assert ok.completion_tokens == 5 and engine.alive
            assert "simulated" in engine.stats()["last_error"]
        finally:
            engine.shutdown()

    asyncio.run(main())
