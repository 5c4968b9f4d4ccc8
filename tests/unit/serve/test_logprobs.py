"""Logprobs, penalties and n choices in the engine: checked against the model's own forward pass (fp32, CPU)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from chatray.serve.app import ServeArgs
from chatray.serve.async_engine import AsyncEngine
from chatray.serve.engine import GenerationEngine
from chatray.serve.logprobs import LogprobFormatter
from chatray.serve.prompting import plan_request
from chatray.serve.sampling import SamplingParams
from chatray.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_request

TOL = 1e-4


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): the model's log-softmax at every position of one unpadded, uncached forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_generated_logprobs_are_the_models_log_softmax(tiny_model):
    model, tok = tiny_model
    assert next(model.parameters()).dtype == torch.float32
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    params = [SamplingParams(max_tokens=12, temperature=0.0, logprobs=5),
              SamplingParams(max_tokens=9, temperature=1.5, top_k=7, seed=3, presence_penalty=1.0,
                             frequency_penalty=0.7, repetition_penalty=1.3, logprobs=0),
              SamplingParams(max_tokens=10, temperature=1.0, seed=4)]  # no logprobs asked: none computed
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    done = engine.generate(prompts, params)
    assert done[2].logprobs == () and done[2].prompt_logprobs is None
    for prompt, p, c in zip(prompts[:2], params[:2], done[:2]):
        assert len(c.logprobs) == c.completion_tokens == p.max_tokens
        ids = prompt + [e.token_id for e in c.logprobs]
        ref = _log_softmax(model, ids)[len(prompt) - 1:-1]  # (max_tokens, V): position j predicts token j + 1
        for step, e in enumerate(c.logprobs):
            # raw distribution: temperature, top-k and the penalties that picked the token do not change it
            assert abs(e.logprob - ref[step, e.token_id].item()) < TOL
            assert len(e.top) == p.logprobs
            values, order = ref[step].topk(p.logprobs) if p.logprobs else (torch.zeros(0), torch.zeros(0))
            assert [i for i, _ in e.top] == order.tolist()
            assert all(abs(lp - v) < TOL for (_, lp), v in zip(e.top, values.tolist()))
        if p.temperature == 0:  # greedy: the chosen token is the top one
            assert all(e.token_id == e.top[0][0] for e in c.logprobs)


def test_prompt_logprobs_score_every_prompt_token(tiny_model):
    model, tok = tiny_model
    prompts = [tok("the quick brown fox jumps", add_special_tokens=False)["input_ids"], [3, 4], [9]]
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    done = engine.generate(prompts, [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2),
                                     SamplingParams(max_tokens=3, temperature=0.0),  # same prefill, not scored
                                     SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)])
    scored = done[0].prompt_logprobs
    assert [e.token_id for e in scored] == prompts[0]
    assert scored[0].logprob is None and scored[0].top == ()
    ref = _log_softmax(model, prompts[0])
    for j, e in enumerate(scored[1:], start=1):
        assert abs(e.logprob - ref[j - 1, prompts[0][j]].item()) < TOL
        assert [i for i, _ in e.top] == ref[j - 1].topk(2).indices.tolist()
    assert done[1].prompt_logprobs is None
    assert [(e.token_id, e.logprob) for e in done[2].prompt_logprobs] == [(9, None)]


def _penalized_greedy(model, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """OpenAI's definition applied by hand: logit -= count * frequency + (count > 0) * presence."""
    ids, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        tok = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
        counts[tok] += 1
        ids.append(tok)
        out.append(tok)
    return out


def test_penalties_change_greedy_output_as_defined(tiny_model):
    model, tok = tiny_model
    prompt = tok("hello, how are you?", add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(model, tok, max_batch_size=4, eos_token_ids=[])
    plain, penalized, present = engine.generate([prompt] * 3, [
        SamplingParams(max_tokens=30, temperature=0.0, logprobs=0),
        SamplingParams(max_tokens=30, temperature=0.0, frequency_penalty=1.2, logprobs=0),
        SamplingParams(max_tokens=30, temperature=0.0, presence_penalty=2.0, logprobs=0)])

    def ids(c):
        return [e.token_id for e in c.logprobs]

    assert ids(plain) == _penalized_greedy(model, prompt, 30, 0.0, 0.0)
    assert ids(penalized) == _penalized_greedy(model, prompt, 30, 0.0, 1.2)
    assert ids(present) == _penalized_greedy(model, prompt, 30, 2.0, 0.0)
    assert ids(penalized) != ids(plain) and ids(present) != ids(plain)
    assert len(set(ids(present))) > len(set(ids(plain)))  # repeats are discouraged


def _plan(tok, body: dict, model=CompletionRequest):
    return plan_request(tok, parse_request(json.dumps(body).encode(), model), context_length=128,
                        vocab_size=len(tok), defaults=ServeArgs(temperature=1.0).sampling_defaults(), max_n=4)


def _with_engine(tiny_model, fn):
    from chatray.serve import choices

    model, tok = tiny_model

    async def main():
        engine = AsyncEngine(GenerationEngine(model, tok, max_batch_size=8, eos_token_ids=[]),
                             batch_wait_timeout_s=0.002, step_delay_s=0.0)
        try:
            return await fn(choices, engine, LogprobFormatter(tok))
        finally:
            engine.shutdown()

    return asyncio.run(main())


async def _collect(agen):
    return [e async for e in agen]


def test_n_choices_whole_and_streamed(tiny_model):
    _, tok = tiny_model
    body = {"messages": [{"role": "user", "content": "hello"}], "n": 3, "seed": 11, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 2}
    plan = _plan(tok, body, ChatCompletionRequest)

    async def run(choices, engine, fmt):
        return (await choices.complete(engine, plan, fmt), await choices.complete(engine, plan, fmt),
                await _collect(choices.stream(engine, plan, fmt)))

    first, again, events = _with_engine(tiny_model, run)
    texts = [c["text"] for c in first["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 3  # three different samples
    assert first == again  # seeded: the same three every time
    assert first["prompt_tokens"] == len(plan.prompt_ids) and first["completion_tokens"] == 36
    for i, c in enumerate(first["choices"]):
        assert c["finish_reason"] == "length" and len(c["logprobs"]) == 12
        assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in c["logprobs"])
        streamed = [e for e in events if e["index"] == i]
        assert "".join(e["text"] for e in streamed if e["event"] == "delta") == c["text"]
        assert [lp for e in streamed if e["event"] == "delta" for lp in e["logprobs"]] == c["logprobs"]
        assert [e["finish_reason"] for e in streamed if e["event"] == "finish"] == ["length"]


def test_echo_scores_the_prompt_without_generating(tiny_model):
    model, tok = tiny_model
    prompt = "the quick brown fox"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    plan = _plan(tok, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1})
    with_gen = _plan(tok, {"prompt": [ids], "echo": True, "max_tokens": 4, "logprobs": 1, "temperature": 0})

    async def run(choices, engine, fmt):
        return (await choices.complete(engine, plan, fmt), await _collect(choices.stream(engine, plan, fmt)),
                await choices.complete(engine, with_gen, fmt))

    whole, events, generated = _with_engine(tiny_model, run)
    (c,) = whole["choices"]
    assert (c["text"], c["finish_reason"], whole["completion_tokens"]) == (prompt, "length", 0)
    lp = c["logprobs"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids] and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _log_softmax(model, ids)
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - ref[j - 1, ids[j]].item()) < TOL
        top = lp["top_logprobs"][j]  # the prompt's token and the most likely one
        assert lp["tokens"][j] in top and max(top.values()) == pytest.approx(ref[j - 1].max().item(), abs=TOL)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids))]
    deltas = [e for e in events if e["event"] == "delta"]
    assert [(e["text"], e["logprobs"]) for e in deltas] == [(prompt, lp)]
    assert [e["finish_reason"] for e in events if e["event"] == "finish"] == ["length"]
    (g,) = generated["choices"]
    assert g["text"].startswith(prompt) and generated["completion_tokens"] == 4
    assert len(g["logprobs"]["tokens"]) == len(ids) + 4 and g["logprobs"]["token_logprobs"][:len(ids)] == \
        lp["token_logprobs"]


def test_token_bytes_are_exact_for_pieces_of_characters(tiny_model):
    _, tok = tiny_model
    fmt = LogprobFormatter(tok)
    ids = tok("你好 fox", add_special_tokens=False)["input_ids"]
    pieces = [fmt.token(i) for i in ids]
    assert b"".join(bytes(b) for _, b in pieces).decode("utf-8") == "你好 fox"
    assert any(text == "\ufffd" for text, _ in pieces)  # a token holding part of a character, as vLLM shows it
    assert fmt.token(tok.eos_token_id) == ("<|endoftext|>", list(b"<|endoftext|>"))
