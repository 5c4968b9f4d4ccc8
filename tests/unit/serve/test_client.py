"""The chat client and REPL against a mock server: SSE parsing, errors, piped input, context trimming."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from chatray.errors import ChatrayError
from chatray.serve.client import ChatClient, ServerError, run_repl


def _sse(*deltas: str) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": d}}]} for d in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def _client(handler) -> ChatClient:
    return ChatClient("http://test/v1", transport=httpx.MockTransport(handler))


def test_repl_streams_each_piped_line_and_keeps_history():
    seen: list[list[dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] is True and body["temperature"] == 0
        seen.append(body["messages"])
        return httpx.Response(200, content=_sse("你好", "!"), headers={"content-type": "text/event-stream"})

    out = io.StringIO()
    turns = run_repl(_client(handler), sampling={"temperature": 0}, system="be brief",
                     stdin=io.StringIO("hello\n\n/reset\nagain\n"), stdout=out, stderr=io.StringIO())
    assert turns == 2
    assert out.getvalue() == "你好!\n你好!\n"
    assert seen[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert seen[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]  # reset


def test_repl_drops_oldest_turns_when_context_is_full():
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        msgs = json.loads(request.content)["messages"]
        calls.append(len(msgs))
        if len(msgs) > 3:
            return httpx.Response(400, json={"error": {"message": "too long", "type": "invalid_request_error",
                                                       "param": "messages", "code": "context_length_exceeded"}})
        return httpx.Response(200, content=_sse("ok"))

    out = io.StringIO()
    run_repl(_client(handler), sampling={}, stdin=io.StringIO("a\nb\nc\n"), stdout=out, stderr=io.StringIO(),
             interactive=False)
    assert out.getvalue() == "ok\nok\nok\n"
    assert calls == [1, 3, 5, 3]


def test_server_errors_become_one_line():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "invalid temperature", "type": "invalid_request_error",
                                                   "param": "temperature", "code": None}})

    with pytest.raises(ServerError, match="server error 400: invalid temperature") as e:
        list(_client(handler).stream("/chat/completions", {"messages": []}))
    assert e.value.param == "temperature"


def test_unreachable_server_has_a_hint():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(ChatrayError) as e:
        _client(handler).models()
    assert "cannot reach" in str(e.value) and "chatray serve" in e.value.hint
