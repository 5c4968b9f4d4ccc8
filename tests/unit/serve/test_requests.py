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
    ({**OK, "n": 2}, "n", "only n=1"),
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


def test_unknown_and_unsupported_fields_are_ignored():
    req = parse_request(json.dumps({**OK, "frobnicate": 1, "logprobs": True, "presence_penalty": 0.5,
                                    "user": "u1", "top_k": -1}).encode(), ChatCompletionRequest)
    assert req.messages[0].text() == "hi"


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
