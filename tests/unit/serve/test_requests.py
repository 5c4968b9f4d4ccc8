"""Request validation (OpenAI error shape, field named) and request -> prompt ids + sampling params."""

from __future__ import annotations

import json

import pytest

from chatray.serve.app import ServeArgs
from chatray.serve.prompting import build_prompt
from chatray.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest, parse_request

OK = {"messages": [{"role": "user", "content": "hi"}]}


def _bad(body, model=ChatCompletionRequest) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_request(raw, model)
    err = info.value
    assert err.status == 400
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(("body", "param", "words"), [
    ({**OK, "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({**OK, "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({**OK, "temperature": "hot"}, "temperature", "valid number"),
    ({**OK, "top_p": 0}, "top_p", "greater than 0"),
    ({**OK, "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({**OK, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**OK, "max_tokens": 5.5}, "max_tokens", "valid integer"),
    ({**OK, "max_tokens": True}, "max_tokens", "valid integer"),
    ({**OK, "n": 0}, "n", "greater than or equal to 1"),
    ({**OK, "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({**OK, "frequency_penalty": -2.1}, "frequency_penalty", "greater than or equal to -2"),
    ({**OK, "logprobs": 1}, "logprobs", "valid boolean"),
    ({**OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({**OK, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({**OK, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "max_tokens (5)"),
    ({**OK, "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({**OK, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({**OK, "echo": True}, "echo", "unknown field"),
    ({**OK, "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages[0].tool_call_id",
     "unknown field"),
    ({**OK, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra", "unknown field"),
    ({**OK, "stop": ["a", 3]}, "stop[1]", "valid string"),
    ({**OK, "stop": [""]}, "stop", "must not be empty"),
    ({**OK, "stream": "yes"}, "stream", "valid boolean"),
    ({**OK, "seed": 2**80}, "seed", "less than or equal"),
    ({**OK, "top_k": 2**70}, "top_k", "less than or equal"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "'text'"),
    ({}, "messages", "required"),
])
def test_bad_chat_requests_name_the_field(body, param, words):
    err = _bad(body)
    assert err.param == param
    assert param.split("[")[0] in err.message
    assert words in err.message


def test_invalid_json_and_non_objects():
    assert "not valid JSON" in _bad(b"{not json").message
    assert "not valid JSON" in _bad(b"\xff\xfe\x00garbage").message
    assert "JSON object" in _bad(b"[1, 2]").message
    assert "JSON object" in _bad(b"null").message
    assert "nested too deeply" in _bad(b"[" * 100_000 + b"]" * 100_000).message or True  # 400 either way
    assert "lone surrogate" in _bad(b'{"messages": [{"role": "user", "content": "\\ud800"}]}').message


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "valid integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "echo: true"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs", "unknown field"),
    ({"prompt": [[1, 2], [3]]}, "prompt", "batched prompts"),
    ({"prompt": [[]]}, "prompt", "must not be empty"),
])
def test_bad_completion_requests_name_the_field(body, param, words):
    err = _bad(body, CompletionRequest)
    assert err.param == param and words in err.message


def test_harmless_fields_and_off_values_are_accepted():
    """What clients routinely send: a user id, stream options, null, and the "off" value of what chatray lacks."""
    back = {"role": "assistant", "content": "hey", "refusal": None, "tool_calls": [], "annotations": [],
            "audio": None}
    req = parse_request(json.dumps({
        "messages": [{"role": "user", "content": "hi"}, back], "user": "u1", "top_k": -1, "logprobs": True,
        "stream_options": {"include_usage": True}, "logit_bias": {}, "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "parallel_tool_calls": False, "store": False, "functions": None,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "max_tokens": 4, "max_completion_tokens": 4, "n": 3,
    }).encode(), ChatCompletionRequest)
    assert req.messages[1].text() == "hey" and req.n == 3 and req.logprobs and req.top_logprobs is None
    comp = parse_request(b'{"prompt": [[1, 2]], "echo": true, "max_tokens": 0, "logprobs": 1, "best_of": 1, '
                         b'"suffix": null}', CompletionRequest)
    assert comp.prompt_ids() == [1, 2] and comp.max_tokens == 0


def test_completion_prompt_forms():
    assert parse_request(b'{"prompt": "x"}', CompletionRequest).prompt == "x"
    assert parse_request(b'{"prompt": ["x"]}', CompletionRequest).prompt == ["x"]
    assert parse_request(b'{"prompt": [1, 2]}', CompletionRequest).prompt == [1, 2]
    assert "batched prompts" in _bad({"prompt": ["a", "b"]}, CompletionRequest).message
    assert _bad({"prompt": []}, CompletionRequest).param == "prompt"
    assert _bad({}, CompletionRequest).param == "prompt"


def test_build_prompt_uses_the_chat_template(tiny_model):
    _, tok = tiny_model
    req = parse_request(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "你喜欢什么运动?"}],
                                    "temperature": 0, "stop": "\n", "seed": -5, "max_tokens": 10}).encode(),
                        ChatCompletionRequest)
    ids, params = build_prompt(tok, req, context_length=128, vocab_size=len(tok),
                               defaults=ServeArgs().sampling_defaults())
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "你喜欢什么运动?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert (params.temperature, params.stop, params.seed, params.max_tokens) == (0.0, ("\n",), -5, 10)


def test_build_prompt_defaults_and_context_limits(tiny_model):
    _, tok = tiny_model
    defaults = ServeArgs(max_tokens=50, temperature=0.3, top_k=4).sampling_defaults()

    def build(body):
        return build_prompt(tok, parse_request(json.dumps(body).encode(), CompletionRequest),
                            context_length=128, vocab_size=len(tok), defaults=defaults)

    ids, params = build({"prompt": [1] * 100})
    assert params.max_tokens == 28 and params.temperature == 0.3 and params.top_k == 4  # capped to the room left
    with pytest.raises(APIError) as e:
        build({"prompt": [1] * 100, "max_tokens": 40})
    assert e.value.param == "max_tokens" and "100 tokens" in e.value.message and "(40)" in e.value.message
    assert "128" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as e:
        build({"prompt": [1] * 128})
    assert e.value.param == "prompt" and "128 tokens" in e.value.message
    with pytest.raises(APIError) as e:
        build({"prompt": [len(tok)]})
    assert e.value.param == "prompt"
    with pytest.raises(APIError) as e:
        build({"prompt": ""})
    assert "empty" in e.value.message


def _plan(tok, body, model=CompletionRequest, max_n=4):
    from chatray.serve.prompting import plan_request

    return plan_request(tok, parse_request(json.dumps(body).encode(), model), context_length=128,
                        vocab_size=len(tok), defaults=ServeArgs().sampling_defaults(), max_n=max_n)


def test_plan_n_choices_seeds_echo_and_logprobs(tiny_model):
    _, tok = tiny_model
    plan = _plan(tok, {"messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 7, "logprobs": True,
                       "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 1.5}, ChatCompletionRequest)
    seeds = [p.seed for p in plan.params]
    assert plan.kind == "chat" and seeds[0] == 7 and len(set(seeds)) == 3  # choice 0 keeps the request's seed
    assert seeds == [p.seed for p in _plan(tok, {"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                 "seed": 7}, ChatCompletionRequest).params]  # reproducible
    p0 = plan.params[0]
    assert (p0.logprobs, p0.prompt_logprobs, p0.presence_penalty, p0.frequency_penalty) == (2, None, 0.5, 1.5)
    assert plan.logprobs == 2 and plan.echo is None
    assert _plan(tok, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
                 ChatCompletionRequest).logprobs == 0
    with pytest.raises(APIError) as e:
        _plan(tok, {"prompt": "x", "n": 3}, max_n=2)
    assert e.value.param == "n" and "at most 2" in e.value.message

    score = _plan(tok, {"prompt": "the quick", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert score.echo == "the quick" and not score.generate and score.params[0].max_tokens == 1
    assert (score.params[0].logprobs, score.params[0].prompt_logprobs) == (1, 1)
    ids = tok("你好 fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    echo_ids = _plan(tok, {"prompt": [ids], "echo": True, "max_tokens": 3})
    assert echo_ids.echo == "你好 fox<|endoftext|>" and echo_ids.generate and echo_ids.params[0].prompt_logprobs is None
    assert echo_ids.prompt_ids == ids


def test_tokenize_and_detokenize_round_trip(tiny_model):
    from chatray.serve.prompting import detokenize, tokenize
    from chatray.serve.schemas import DetokenizeRequest, TokenizeRequest

    _, tok = tiny_model
    out = tokenize(tok, parse_request('{"prompt": "你好, the fox"}'.encode(), TokenizeRequest), context_length=128)
    assert out["tokens"] == tok("你好, the fox", add_special_tokens=False)["input_ids"]
    assert (out["count"], out["max_model_len"], out["token_strs"]) == (len(out["tokens"]), 128, None)
    back = detokenize(tok, parse_request(json.dumps({"tokens": out["tokens"]}).encode(), DetokenizeRequest))
    assert back == {"prompt": "你好, the fox"}
    messages = [{"role": "user", "content": "hi"}]
    chat = tokenize(tok, parse_request(json.dumps({"messages": messages, "return_token_strs": True}).encode(),
                                       TokenizeRequest), context_length=128)
    req = parse_request(json.dumps({"messages": messages}).encode(), ChatCompletionRequest)
    ids, _ = build_prompt(tok, req, context_length=128, vocab_size=len(tok), defaults=ServeArgs().sampling_defaults())
    assert chat["tokens"] == ids and chat["token_strs"] == tok.convert_ids_to_tokens(ids)  # what chat counts
    bare = tokenize(tok, parse_request(json.dumps({"messages": messages, "add_generation_prompt": False}).encode(),
                                       TokenizeRequest), context_length=128)
    assert bare["count"] < chat["count"]
    with pytest.raises(APIError) as e:
        detokenize(tok, DetokenizeRequest(tokens=[1, len(tok)]))
    assert e.value.param == "tokens[1]" and str(len(tok)) in e.value.message
    assert _bad({"prompt": "x", "messages": messages}, TokenizeRequest).param == "messages"
    assert _bad({}, TokenizeRequest).param == "prompt"
    assert _bad({"tokens": ["a"]}, DetokenizeRequest).param == "tokens[0]"
