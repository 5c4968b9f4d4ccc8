"""Serving for real: Ray Serve on the session's local Ray, real HTTP, the official `openai` client.

Two applications share one Serve instance (deployed once for the module to keep CI time down):
  * ``main`` at ``/``: autoscaling generator (1..2 replicas, short delays), no API key;
  * ``guarded`` at ``/guarded``: API key, 4 KiB body limit, one slow replica (a per-step delay) with tiny
    queue limits, for backpressure, disconnect and timeout tests.
The autoscaling and redeploy tests come last: they change ``main``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_fixtures import Load, free_port, make_tiny_checkpoint, wait_for

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"
GEN_CPUS = 0.1  # the training tests share the 2-CPU session Ray
# One pooled client for the whole module: a new httpx client per request costs ~50 ms of CPU (SSL context).
HTTP = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from chatray.serve.app import build_app_with_options

    root = tmp_path_factory.mktemp("serve-it")
    # Runs laid out as training writes them; served as <run>:best through chatray's checkpoint resolver.
    folder_a = make_tiny_checkpoint(root / "run-a" / "checkpoint_00000001", seed=0)
    make_tiny_checkpoint(root / "run-b" / "checkpoint_00000001", seed=1)
    ckpt_a, ckpt_b = f"{root / 'run-a'}:best", f"{root / 'run-b'}:best"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    ingress_opts = {"ray_actor_options": {"num_cpus": 0.05}, "max_surge_percent": 100}
    main_deployments = {
        "Ingress": ingress_opts,
        "Generator": {
            "ray_actor_options": {"num_cpus": GEN_CPUS}, "max_ongoing_requests": 8, "max_queued_requests": 256,
            "max_surge_percent": 100, "graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 20,
            "health_check_period_s": 2,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                   "upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 2,
                                   "metrics_interval_s": 0.5},
        },
    }

    def main_app(ckpt: str, env: dict | None = None):
        # A 10 ms pause per decode step keeps requests in flight (what autoscaling reacts to) without burning
        # the CPU that new replicas need to start on this small machine.
        deployments = main_deployments
        if env:  # e.g. S3 credentials/endpoint for the replicas (the session's Ray started before they were set)
            gen = {**main_deployments["Generator"]}
            gen["ray_actor_options"] = {**gen["ray_actor_options"], "runtime_env": {"env_vars": env}}
            deployments = {**main_deployments, "Generator": gen}
        return build_app_with_options({"checkpoint": str(ckpt), "api_key_env": None, "temperature": 0.0,
                                       "max_tokens": 16, "max_batch_size": 8, "step_delay_s": 0.01,
                                       "cache_dir": str(root / "cache")}, deployments)

    # The replica reads the key from this file itself (the key never travels in the app's args); the session's Ray
    # started before this test, so a variable set here now would not reach the replica.
    key_file = root / "api_key"
    key_file.write_text(KEY + "\n")
    guarded = build_app_with_options(
        {"checkpoint": str(ckpt_a), "api_key_file": str(key_file), "max_body_bytes": 4096, "step_delay_s": 0.05,
         "max_batch_size": 2, "request_timeout_s": 3, "temperature": 0.0},
        {"Ingress": ingress_opts,
         "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": GEN_CPUS}, "max_ongoing_requests": 2,
                       "max_queued_requests": 2, "backpressure_config": {"status_code": 503, "retry_after_s": 2}}})
    serve.run_many([serve.RunTarget(main_app(ckpt_a), name="main", route_prefix="/"),
                    serve.RunTarget(guarded, name="guarded", route_prefix="/guarded")])
    url = f"http://127.0.0.1:{port}"
    from transformers import AutoTokenizer

    try:
        yield {"url": url, "ckpt_a": ckpt_a, "ckpt_b": ckpt_b, "main_app": main_app, "folder_a": folder_a,
               "tok": AutoTokenizer.from_pretrained(folder_a), "serve": serve, "cache": root / "cache"}
    finally:
        HTTP.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def oai(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def local_engine(served):
    """The engine a ``main`` replica runs, here in-process (fp32, CPU): the reference for what HTTP returns."""
    from chatray.model import load_model, load_model_tokenizer
    from chatray.serve.engine import GenerationEngine

    folder = served["folder_a"]
    return GenerationEngine(load_model(folder), load_model_tokenizer(folder), max_batch_size=1)


@pytest.fixture(scope="module")
def greedy(local_engine):
    """What ``main``'s model generates greedily for prompt ids."""
    from chatray.serve.sampling import SamplingParams

    return lambda ids, max_tokens: local_engine.generate([ids], SamplingParams(max_tokens=max_tokens,
                                                                               temperature=0.0))[0]


def _chat(url: str, body: dict, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    return HTTP.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=timeout)


def _generator_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=app).stats.remote().result(timeout_s=10)


def _replicas(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["Generator"].replica_states
    return int(states.get("RUNNING", 0))


def _assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------- basics
def test_health_ready_and_models(served):
    url = served["url"]
    assert HTTP.get(url + "/healthz").json() == {"status": "ok"}
    assert HTTP.get(url + "/readyz").json() == {"status": "ready", "model": "run-a"}
    (model,) = HTTP.get(url + "/v1/models").json()["data"]
    assert model["id"] == "run-a" and model["checkpoint"] == served["ckpt_a"]
    assert model["context_length"] == 128


def test_openai_client_chat_non_streaming_and_streaming(served, oai, greedy):
    tok = served["tok"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你喜欢什么运动?"}]
    prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    r = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    want = greedy(prompt_ids, 12)  # 12 tokens ("length"), or fewer ending with EOS ("stop")
    assert (text, r.choices[0].finish_reason, r.usage.completion_tokens) == \
        (want.text, want.finish_reason, want.completion_tokens)

    chunks = list(oai.chat.completions.create(model="run-a", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_openai_client_completions(served, oai, greedy):
    tok = served["tok"]
    r = oai.completions.create(model="run-a", prompt="the quick brown fox", max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == len(tok("the quick brown fox", add_special_tokens=False)["input_ids"])
    want = greedy(tok("the quick brown fox", add_special_tokens=False)["input_ids"], 10)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == \
        (want.text, want.finish_reason, want.completion_tokens)
    stream = oai.completions.create(model="run-a", prompt="the quick brown fox", max_tokens=10, temperature=0,
                                    stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    # token-id prompts work too
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    r2 = oai.completions.create(model="run-a", prompt=ids, max_tokens=10, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_seed_reproducibility(oai):
    def run(seed: int) -> str:
        r = oai.chat.completions.create(model="run-a", messages=[{"role": "user", "content": "hello"}],
                                        max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return r.choices[0].message.content

    assert run(7) == run(7)
    assert len({run(s) for s in (7, 8, 9)}) > 1


def test_stop_sequences(oai):
    messages = [{"role": "user", "content": "hello, how are you?"}]
    full = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 6, text
    stop = text[3:5]
    want = text[: text.find(stop)]
    for stream in (False, True):
        r = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=30, temperature=0,
                                        stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            got, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert got == want and reason == "stop"


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("invalid json", b'{"messages": [', 400, None),
    ("not an object", b"[1,2,3]", 400, None),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature high", {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.1}, 400, "temperature"),
    ("temperature low", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("top_p high", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.01}, 400, "top_p"),
    ("max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("context", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 127}, 400, "max_tokens"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("missing messages", {"prompt": "hi"}, 400, "messages"),
    ("n over max_n", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, 400, "n"),
    ("unsupported", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("unknown", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "frobnicate"),
    ("penalty range", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, 400,
     "presence_penalty"),
    ("stream not bool", {"messages": [{"role": "user", "content": "hi"}], "stream": "sure"}, 400, "stream"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_errors(served, name, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):
        if stream and isinstance(body, dict):
            raw = json.dumps({**body, "stream": True} if name != "stream not bool" else body).encode()
        r = HTTP.post(served["url"] + "/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=30)
        err = _assert_openai_error(r, status, param)
        if name == "context":
            assert "127" in err["message"] and "128" in err["message"], err  # names both numbers


def test_context_overflow_on_completions_names_both_numbers(served):
    r = HTTP.post(served["url"] + "/v1/completions", json={"prompt": [5] * 100, "max_tokens": 50}, timeout=30)
    err = _assert_openai_error(r, 400, "max_tokens")
    assert "100 tokens" in err["message"] and "(50)" in err["message"] and "128" in err["message"]


def test_harmless_fields_are_accepted(served):
    r = _chat(served["url"], {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "me",
                              "presence_penalty": 0.3, "logit_bias": {}, "tools": None})
    assert r.status_code == 200, r.text


def test_body_too_large_routes_and_methods(served):
    url = served["url"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    _assert_openai_error(HTTP.post(url + "/v1/chat/completions", content=big, timeout=30), 413)
    # chunked upload without Content-Length is counted too (guarded limit: 4 KiB)
    chunks = iter([b'{"messages": [{"role": "user", "content": "', b"y" * 8192, b'"}]}'])
    r = HTTP.post(url + "/guarded/v1/chat/completions", content=chunks,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    _assert_openai_error(r, 413)
    _assert_openai_error(HTTP.get(url + "/v1/nothing-here"), 404)
    _assert_openai_error(HTTP.get(url + "/v1/chat/completions"), 405)


def test_api_key(served):
    g = served["url"] + "/guarded"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _assert_openai_error(_chat(g, body), 401)
    _assert_openai_error(_chat(g, body, {"Authorization": "Bearer wrong"}), 401)
    _assert_openai_error(_chat(g, body, {"Authorization": KEY}), 401)  # no "Bearer"
    _assert_openai_error(HTTP.get(g + "/v1/models"), 401)
    assert _chat(g, body, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert HTTP.get(g + "/healthz").status_code == 200  # health stays open for probes


def _fuzz_bodies(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    scalars = [None, True, False, 0, -1, 1, 2**70, -(2**70), 0.5, -3.2, 1e308, "", "x", "你好", "\ud800", [], {},
               [1], ["a"], {"a": 1}, "\x00", " " * 50, "NaN"]
    fields = ["messages", "prompt", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "n", "stream",
              "repetition_penalty", "stream_options", "max_completion_tokens", "model"]
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # random bytes
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:  # truncated valid JSON
            raw = json.dumps(good).encode()
            out.append(raw[: rng.randrange(1, len(raw))])
        elif kind == 2:  # valid JSON, one field with a random value
            body = dict(good)
            body[rng.choice(fields)] = rng.choice(scalars)
            out.append(json.dumps(body).encode())
        elif kind == 3:  # messages with random junk inside
            msg = {rng.choice(["role", "content", "name", "x"]): rng.choice(scalars) for _ in range(3)}
            out.append(json.dumps({"messages": [msg, rng.choice(scalars)], "max_tokens": 4}).encode())
        elif kind == 4:  # deep nesting / odd top level
            depth = rng.choice([10, 1000, 5000])
            out.append(rng.choice([b"[" * depth + b"]" * depth, b'{"messages":' * depth, b"null", b"123", b'"s"']))
        else:  # NaN/Infinity literals and duplicate keys
            out.append(rng.choice([b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
                                   b'{"messages":[{"role":"user","content":"hi"}],"top_p":Infinity}',
                                   b'{"messages":1,"messages":[{"role":"user","content":"hi"}],"max_tokens":2}',
                                   b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":-Infinity}']))
    return out


def test_fuzz_malformed_bodies_never_5xx(served):
    url = served["url"]
    bodies = _fuzz_bodies(300)

    def send(item: tuple[int, bytes]) -> tuple[int, bytes]:
        i, raw = item
        path = "/v1/completions" if i % 7 == 0 else "/v1/chat/completions"
        r = HTTP.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
        return r.status_code, r.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, enumerate(bodies)))
    codes = [c for c, _ in results]
    assert not [c for c in codes if c >= 500], [(c, b[:200]) for c, b in results if c >= 500][:5]
    for code, content in results:
        if code != 200:
            assert set(json.loads(content)["error"]) == {"message", "type", "param", "code"}
    assert codes.count(400) > 150
    assert HTTP.get(url + "/healthz").status_code == 200
    assert HTTP.get(url + "/readyz").status_code == 200
    assert _chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code == 200
    assert _generator_stats("main")["alive"]


# ---------------------------------------------------------------------------------------------- OpenAI completeness
def _log_softmax(local_engine, ids: list[int]):
    """(len(ids), V): the model's own log-softmax at every position (one unpadded forward, fp32, CPU)."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(local_engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_chat_logprobs_match_the_models_log_softmax(served, oai, local_engine):
    from chatray.serve.sampling import SamplingParams

    tok = served["tok"]
    messages = [{"role": "user", "content": "hello, how are you?"}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    r = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = [e.token_id for e in local_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0,
                                                                              logprobs=0))[0].logprobs]
    assert len(content) == len(ids) == r.usage.completion_tokens
    ref = _log_softmax(local_engine, prompt + ids)[len(prompt) - 1:-1]
    for step, (entry, token_id) in enumerate(zip(content, ids)):
        assert entry.token == tok.decode([token_id]) and abs(entry.logprob - ref[step, token_id].item()) < 1e-4
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref[step].topk(3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy picked the most likely token
    chunks = list(oai.chat.completions.create(model="run-a", messages=messages, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in content]
    plain = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completions_echo_scores_the_prompt(served, oai, local_engine):
    """How evaluation harnesses (lm-eval's local-completions) score text: echo + logprobs, no or one new token."""
    tok = served["tok"]
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ref = _log_softmax(local_engine, ids)
    for prompt, max_tokens in ((text, 0), ([ids], 1)):
        r = oai.completions.create(model="run-a", prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1,
                                   temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(text) and r.usage.completion_tokens == max_tokens
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([ref[j - 1, ids[j]].item() for j in range(1, len(ids))],
                                                              abs=1e-4)
        assert all(len(top) in (1, 2) and lp.tokens[j] in top for j, top in enumerate(lp.top_logprobs) if j)
        assert lp.text_offset[0] == 0
    stream = list(oai.completions.create(model="run-a", prompt=text, max_tokens=0, echo=True, logprobs=1,
                                         stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_n_choices_and_penalties(served, oai, local_engine):
    from chatray.serve.sampling import SamplingParams

    messages = [{"role": "user", "content": "hello"}]
    r = oai.chat.completions.create(model="run-a", messages=messages, n=3, max_tokens=12, temperature=1.0, seed=5,
                                    logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)  # usage counts all choices
    again = oai.chat.completions.create(model="run-a", messages=messages, n=3, max_tokens=12, temperature=1.0,
                                        seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    chunks = list(oai.chat.completions.create(model="run-a", messages=messages, n=3, max_tokens=12, temperature=1.0,
                                              seed=5, stream=True, stream_options={"include_usage": True}))
    for i, choice in enumerate(r.choices):
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == i) == choice.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    tok = served["tok"]
    prompt = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    plain = oai.completions.create(model="run-a", prompt=prompt, max_tokens=24, temperature=0)
    for kw in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
        got = oai.completions.create(model="run-a", prompt=prompt, max_tokens=24, temperature=0, **kw)
        want = local_engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, **kw))[0]
        assert got.choices[0].text == want.text and got.choices[0].text != plain.choices[0].text


def test_tokenize_detokenize_and_unsupported_fields(served, oai):
    import openai

    url = served["url"]
    messages = [{"role": "user", "content": "你喜欢什么运动?"}]
    t = HTTP.post(url + "/tokenize", json={"model": "run-a", "messages": messages}).json()
    r = oai.chat.completions.create(model="run-a", messages=messages, max_tokens=2)
    assert t["count"] == len(t["tokens"]) == r.usage.prompt_tokens and t["max_model_len"] == 128
    p = HTTP.post(url + "/tokenize", json={"prompt": "你好, the fox"}).json()
    assert HTTP.post(url + "/detokenize", json={"tokens": p["tokens"]}).json() == {"prompt": "你好, the fox"}
    _assert_openai_error(HTTP.post(url + "/detokenize", json={"tokens": [1, 10**6]}), 400, "tokens[1]")
    _assert_openai_error(HTTP.post(url + "/tokenize", json={"text": "x"}), 400, "text")
    g = url + "/guarded"
    _assert_openai_error(HTTP.post(g + "/tokenize", json={"prompt": "x"}), 401)
    assert HTTP.post(g + "/tokenize", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    for kwargs, param in (({"logit_bias": {"1": 5}}, "logit_bias"), ({"extra_body": {"best_of": 2}}, "best_of"),
                          ({"extra_body": {"guided_json": {}}}, "guided_json")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="run-a", messages=messages, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param and param in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="run-a", messages=messages, max_tokens=2, max_completion_tokens=3)
    assert e.value.body["param"] == "max_completion_tokens"


# ---------------------------------------------------------------------------------------------- load edges
def test_backpressure_under_a_burst(served):
    g = served["url"] + "/guarded"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: _chat(g, body, headers), range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            _assert_openai_error(r, 503)
            assert r.headers["retry-after"] == "2"
    assert _chat(g, body, headers).status_code == 200  # and it recovers


def test_client_disconnect_cancels_generation(served):
    g = served["url"] + "/guarded"
    headers = {"Authorization": f"Bearer {KEY}"}
    before = _generator_stats("guarded")["aborted"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}
    with HTTP.stream("POST", g + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data:") for line in got)
    # 100 tokens at 50 ms/step would keep the replica busy for ~5 s: cancellation frees it at once
    wait_for(lambda: _generator_stats("guarded")["aborted"] > before and _generator_stats("guarded")["running"] == 0,
             timeout=3, what="the generation to be aborted")
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        _chat(g, {**body, "stream": False}, headers, timeout=0.5)
    wait_for(lambda: _generator_stats("guarded")["aborted"] > before + 1, timeout=4, what="non-streaming abort")


def test_timeout_is_408(served):
    g = served["url"] + "/guarded"
    headers = {"Authorization": f"Bearer {KEY}"}
    t0 = time.monotonic()
    r = _chat(g, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120}, headers)
    _assert_openai_error(r, 408)
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------------------------------------- CLI
def test_chatray_chat_with_piped_input(served, oai):
    exe = Path(sys.executable).parent / "chatray"
    proc = subprocess.run([str(exe), "chat", "--url", served["url"], "--temperature", "0", "--max-tokens", "8"],
                          input="hello\n你喜欢什么运动?\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHATRAY_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    history: list[dict] = []
    expected = ""
    for line in ["hello", "你喜欢什么运动?"]:
        history.append({"role": "user", "content": line})
        reply = oai.chat.completions.create(model="run-a", messages=history, max_tokens=8,
                                            temperature=0).choices[0].message.content
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert proc.stdout == expected
    one = subprocess.run([str(exe), "generate", "--url", served["url"], "--temperature", "0", "--max-tokens", "8",
                          "hello"], capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                      "CHATRAY_API_KEY": ""})
    assert one.returncode == 0 and one.stdout == expected.split("\n")[0] + "\n"


# ---------------------------------------------------------------------------------------------- scaling
def test_autoscaling_up_and_down(served):
    url = served["url"]
    assert _replicas("main") == 1
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "temperature": 1.0,
            "ignore_eos": True}
    t0 = time.monotonic()
    with Load(lambda: _chat(url, body, timeout=60).status_code, n=6) as load:
        wait_for(lambda: _replicas("main") == 2, timeout=90, what="scale up to 2 replicas")
        print(f"scaled up after {time.monotonic() - t0:.1f}s")
        time.sleep(1.0)  # traffic keeps flowing to both
    assert load.failures == [] and load.total > 8
    t0 = time.monotonic()
    wait_for(lambda: _replicas("main") == 1, timeout=60, what="scale down to 1 replica")
    print(f"scaled down after {time.monotonic() - t0:.1f}s ({load.total} requests, none failed)")
    assert _chat(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code == 200


def test_redeploy_under_load_keeps_answering(served, s3_server):
    """Zero-downtime model update: redeploy ``main`` with run-b, now read from S3, while clients keep asking."""
    from ray import serve

    from chatray.storage.uri import upload_dir

    bucket_run = f"s3://{s3_server['bucket']}/runs/run-b"
    upload_dir(served["ckpt_b"].removesuffix(":best") + "/checkpoint_00000001", bucket_run + "/checkpoint_00000001")
    url = served["url"]
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    models: set[str] = set()
    lock = threading.Lock()

    def request() -> int:
        r = _chat(url, body, timeout=60)
        if r.status_code == 200:
            with lock:
                models.add(r.json()["model"])
        return r.status_code

    with Load(request, n=2) as load:  # below the autoscaling target: one replica, replaced
        time.sleep(1.0)
        t0 = time.monotonic()
        new_app = served["main_app"](bucket_run + ":best", env=s3_server["env"])
        serve.run(new_app, name="main", route_prefix="/")  # blocks until the new version is running
        print(f"redeployed in {time.monotonic() - t0:.1f}s")
        wait_for(lambda: "run-b" in models, timeout=30, what="responses from the new model")
        time.sleep(1.0)
    assert load.failures == [], load.failures[:5]
    assert models == {"run-a", "run-b"}
    (model,) = HTTP.get(url + "/v1/models").json()["data"]
    assert model["id"] == "run-b" and model["checkpoint"] == bucket_run + ":best"
    assert [p for p in served["cache"].iterdir() if not p.name.startswith(".")]  # copied once into the cache
