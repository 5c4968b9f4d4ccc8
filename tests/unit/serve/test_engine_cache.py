"""The engine's KV cache and scheduler: allocated once, written in place, chunked prefill by token budget,
waiting when full, and failures that stay with their request."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from support.generation import hf_greedy, spy_token_ids

from chatray.serve.async_engine import AsyncEngine
from chatray.serve.cudagraphs import batch_buckets, length_buckets
from chatray.serve.engine import GenerationEngine
from chatray.serve.gpt2 import GPT2Forward
from chatray.serve.kvcache import CacheShape, cache_slots_for_budget
from chatray.serve.outputs import EngineError
from chatray.serve.sampling import SamplingParams


def test_chunked_prefill_gives_hf_greedy_tokens(tiny_model):
    """Prompts longer than the token budget are prefilled over several steps, and the tokens are still exactly
    what transformers' generate picks."""
    model, tok = tiny_model
    rng = random.Random(3)
    prompts = [[rng.randrange(len(tok)) for _ in range(n)] for n in (45, 3, 30, 17, 60)]
    engine = GenerationEngine(model, tok, max_batch_size=3, max_num_batched_tokens=16, eos_token_ids=[])
    got = spy_token_ids(engine)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, SamplingParams(max_tokens=12, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    assert sorted(got) == [f"p{i}" for i in range(len(prompts))]
    for i, p in enumerate(prompts):
        assert got[f"p{i}"] == hf_greedy(model, p, 12), f"prompt {i} ({len(p)} tokens) diverged"
    assert engine.stats["steps"] >= sum(map(len, prompts)) // 16  # the budget really cut them


def test_a_long_prompt_does_not_stall_running_requests(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=4, max_num_batched_tokens=10, eos_token_ids=[])
    engine.add_request("short", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0))
    engine.step()
    engine.add_request("long", list(range(5, 85)), SamplingParams(max_tokens=3, temperature=0.0))
    per_step = []
    for _ in range(12):
        per_step.append({o.request_id for o in engine.step()})
    # "short" gets a token in every step while the 80-token prompt goes in 9 tokens at a time
    assert all("short" in ids for ids in per_step)
    first_long = next(i for i, ids in enumerate(per_step) if "long" in ids)
    assert first_long == 80 // 9  # the 9th step finishes its prompt (10-token budget, 1 for "short")


def test_cache_is_allocated_once_and_joining_or_leaving_never_moves_another_sequence(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    pointers = [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)]
    engine.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=40, temperature=0.0))
    for _ in range(3):
        engine.step()
    slot = engine.scheduler.running[0].slot
    before = engine.cache.keys[0][slot, :, :6].clone()
    engine.add_request("b", [9, 8, 7], SamplingParams(max_tokens=2, temperature=0.0))  # joins, then finishes
    for _ in range(3):
        engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["a"] and engine.scheduler.running[0].slot == slot
    assert torch.equal(engine.cache.keys[0][slot, :, :6], before)  # a's cache: untouched, not copied
    assert [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)] == pointers


def test_a_full_cache_makes_requests_wait_in_order(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=2, eos_token_ids=[])
    for i in range(5):
        engine.add_request(f"r{i}", [1 + i, 2], SamplingParams(max_tokens=3 + i, temperature=0.0))
    started: list[str] = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.completion_tokens == 1:
                started.append(o.request_id)
        assert engine.cache.used_slots <= 2 and engine.num_running() <= 2
    assert started == [f"r{i}" for i in range(5)]  # first come, first served
    assert engine.stats["finished"] == 5 and engine.stats["failed"] == 0


def test_kv_budget_limits_the_slots_with_a_clear_error_when_not_even_one_fits():
    shape = CacheShape(layers=12, heads=12, head_dim=64, positions=1024)
    per = shape.slot_bytes(torch.bfloat16)
    assert per == 2 * 12 * 12 * 1025 * 64 * 2
    assert cache_slots_for_budget(shape, torch.bfloat16, 64, None) == 64
    assert cache_slots_for_budget(shape, torch.bfloat16, 64, 10 * per + 1) == 10
    with pytest.raises(ValueError, match=r"does not hold one sequence of 1024 tokens.*lower max_model_len"):
        cache_slots_for_budget(shape, torch.bfloat16, 64, per - 1)


def test_settings_that_cannot_work_are_refused(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) must exceed max_batch_size \(16\)"):
        GenerationEngine(model, tok, max_batch_size=16, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds the model's context of 128"):
        GenerationEngine(model, tok, max_batch_size=2, max_model_len=4096)
    short = GenerationEngine(model, tok, max_batch_size=2, max_model_len=32)
    with pytest.raises(ValueError, match=r"= 40 exceeds the model's context of 32"):
        short.add_request("x", [1] * 30, SamplingParams(max_tokens=10))


def test_other_architectures_are_named_in_the_error():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                         attention_types=[[["global"], 1]], max_position_embeddings=32))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*got 'gpt_neo'"):
        GPT2Forward(neo)


def test_a_failing_request_fails_alone_and_the_batch_goes_on(tiny_model):
    """A request whose forward pass raises gets an error; the others finish with exactly their own tokens."""
    model, tok = tiny_model
    poison = 77
    prompts = {"a": [1, 2, 3], "bad": [4, poison, 6], "c": [7, 8]}
    params = SamplingParams(max_tokens=8, temperature=0.0)
    alone = {rid: GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[]).generate([p], params)[0].text
             for rid, p in prompts.items() if rid != "bad"}
    core = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])

    def poisoned(real):
        def forward(tokens, *args, **kwargs):
            if bool((tokens == poison).any()):
                raise RuntimeError("simulated kernel failure")
            return real(tokens, *args, **kwargs)
        return forward

    core.forward.hidden = poisoned(core.forward.hidden)  # decode steps
    core.forward.prefill_hidden = poisoned(core.forward.prefill_hidden)  # prompts

    async def main():
        engine = AsyncEngine(core, batch_wait_timeout_s=0.01, step_delay_s=0.0)
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(engine.generate(p, params) for p in prompts.values()), return_exceptions=True), 30)
            out = dict(zip(prompts, results))
            assert isinstance(out["bad"], EngineError) and "simulated kernel failure" in str(out["bad"])
            assert {rid: out[rid].text for rid in alone} == alone
            again = await engine.generate([1, 2, 3], params)  # the replica goes on
            assert again.text == alone["a"] and engine.alive
            assert core.stats["failed"] == 1 and core.cache.used_slots == 0
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_prompt_logprobs_are_the_same_when_the_prompt_is_chunked(tiny_model):
    model, tok = tiny_model
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, logprobs=1)
    whole = GenerationEngine(model, tok, max_batch_size=2, eos_token_ids=[]).generate([prompt], params)[0]
    chunked = GenerationEngine(model, tok, max_batch_size=2, max_num_batched_tokens=7,
                               eos_token_ids=[]).generate([prompt], params)[0]
    assert whole.prompt_logprobs is not None and len(whole.prompt_logprobs) == len(prompt)
    assert [e.token_id for e in chunked.prompt_logprobs] == prompt
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert whole.prompt_logprobs[0].logprob is None and chunked.text == whole.text


def test_graph_buckets_cover_every_size():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(1) == [1] and batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert length_buckets(1024) == [128, 256, 512, 1024] and length_buckets(100) == [100]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tiny_checkpoint):  # pragma: no cover - runs on GPU machines only
    from chatray.model import load_model, load_model_tokenizer

    model, tok = load_model(tiny_checkpoint, device="cuda", dtype="float32"), load_model_tokenizer(tiny_checkpoint)
    prompts = [[1, 2, 3], [4, 5], [6] * 20]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    eager = GenerationEngine(model, tok, max_batch_size=4, cuda_graphs=False, eos_token_ids=[])
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    assert engine.warm_up() > 0  # captured, not fallen back to eager
    got = spy_token_ids(engine)
    graphed = engine.generate(prompts, params)
    assert [c.text for c in graphed] == [c.text for c in eager.generate(prompts, params)]
    assert engine._graphs is not None
    for p, ids in zip(prompts, got.values()):
        assert ids == hf_greedy(model, p, 20)


def test_decode_runs_eagerly_when_a_cuda_graph_cannot_be_captured(tiny_model, caplog):
    """A capture failure (an op the installed CUDA cannot capture) costs speed, never a request."""
    from chatray.serve.cudagraphs import GraphCaptureError

    model, tok = tiny_model
    params = SamplingParams(max_tokens=6, temperature=0.0)
    want = GenerationEngine(model, tok, max_batch_size=2, eos_token_ids=[]).generate([[1, 2, 3]], params)[0].text
    engine = GenerationEngine(model, tok, max_batch_size=2, eos_token_ids=[])

    class Uncapturable:
        def __call__(self, inputs, attn_len):
            raise GraphCaptureError("capturing the decode step (1 rows, 128 positions) as a CUDA graph failed")

        def warm_up(self):
            self(None, 0)

    engine._graphs = Uncapturable()
    assert engine.warm_up() == 0 and engine._graphs is None
    assert "decode steps run eagerly" in caplog.text
    engine._graphs = Uncapturable()  # also when the first capture happens mid-request
    assert engine.generate([[1, 2, 3]], params)[0].text == want
    assert engine._graphs is None and engine.stats["failed"] == 0


def test_bucketed_decode_steps_give_the_exact_steps_tokens(tiny_model):
    """What the CUDA graphs replay, run eagerly on CPU: rows padded up to a batch bucket (writing to the scratch
    position), attention over a length bucket (positions past each row's own masked), slots with holes left by
    finished requests. Greedy tokens are those of exact-size steps."""
    from chatray.serve.cudagraphs import DecodeGraphs

    class EagerReplay(DecodeGraphs):  # the capture machinery without CUDA: replay = the same call on the buffers
        def _capture_graph(self, rows, length):
            args = (self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows], length)
            out = self._decode(*args).clone()

            class Replay:
                def replay(self_inner):
                    out.copy_(self._decode(*args))

            self._graphs[(rows, length)] = (Replay(), out)
            return Replay(), out

    model, tok = tiny_model
    rng = random.Random(5)
    prompts = [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))] for _ in range(9)]
    lengths = [rng.randint(2, 30) for _ in prompts]

    def run(engine):
        got = spy_token_ids(engine)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0))
            engine.step()  # arrivals spread over steps: slots free up and fill again with holes between
        while engine.has_unfinished():
            engine.step()
        return got

    exact = run(GenerationEngine(model, tok, max_batch_size=6, eos_token_ids=[]))
    bucketed = GenerationEngine(model, tok, max_batch_size=6, max_model_len=100, eos_token_ids=[])
    bucketed._graphs = EagerReplay(bucketed._eager_decode, max_rows=6, max_len=100,
                                   scratch=bucketed.cache.scratch, device=bucketed.device)
    assert bucketed._graphs.rows == [1, 2, 4, 6] and bucketed._graphs.lengths == [100]
    assert run(bucketed) == exact
    assert {rows for rows, _ in bucketed._graphs._graphs} >= {4, 6}  # padded buckets were used


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch_mates_ask_for(tiny_model):
    model, tok = tiny_model
    mine = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[]).generate([[10, 20, 30]], mine)[0]
    for mate in (SamplingParams(max_tokens=12, temperature=1.0, seed=9), SamplingParams(max_tokens=12, top_p=0.9),
                 SamplingParams(max_tokens=12, top_k=50), SamplingParams(max_tokens=3, temperature=0.0,
                                                                         repetition_penalty=1.5)):
        engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
        assert engine.generate([[10, 20, 30], [40, 50, 60]], [mine, mate])[0].text == alone.text, mate


def test_a_batch_retried_row_by_row_gives_what_it_would_have_given(tiny_model, monkeypatch):
    """A failure after the batch was sampled (here: logprobs, e.g. out of memory) is retried row by row; the retry
    finds no trace of the first attempt in the penalties' history, and prompt logprobs are not doubled."""
    import chatray.serve.engine as engine_module

    model, tok = tiny_model
    both = {"max_tokens": 8, "temperature": 1.0, "frequency_penalty": 2.0, "logprobs": 0, "prompt_logprobs": 1}
    params = [SamplingParams(**both, repetition_penalty=1.5, seed=1), SamplingParams(**both, seed=2)]
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    want = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[]).generate(prompts, params)
    real = engine_module.position_logprobs
    calls = {"scoring": 0, "batched sampling": 0}
    failures = {"left": 2}

    def flaky(raw, chosen, k):
        # Fail once while scoring the first prompt chunk of the batched prefill, and once in the first batched
        # decode step (the second batched sampling call; the first is the prefill's), after the batch was sampled.
        kind = "scoring" if k == 1 else "batched sampling" if raw.shape[0] == 2 else "row"
        calls[kind] = calls.get(kind, 0) + 1
        if (kind, calls[kind]) in (("scoring", 1), ("batched sampling", 2)):
            failures["left"] -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(raw, chosen, k)

    monkeypatch.setattr(engine_module, "position_logprobs", flaky)
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    got = engine.generate(prompts, params)
    assert failures["left"] == 0 and engine.stats["failed"] == 0
    assert [c.text for c in got] == [c.text for c in want]
    for g, w, p in zip(got, want, prompts):
        assert [e.token_id for e in g.prompt_logprobs] == p == [e.token_id for e in w.prompt_logprobs]
        assert [e.token_id for e in g.logprobs] == [e.token_id for e in w.logprobs]


def test_generate_shares_the_engine_with_other_requests(tiny_model):
    model, tok = tiny_model
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    engine.add_request("someone-else", [9, 9], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    mine = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0.0))
    assert mine[0].completion_tokens == 5
    assert [s.request_id for s in engine.scheduler.running] == ["someone-else"]
