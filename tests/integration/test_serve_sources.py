"""What a deployment serves, for real: one pinned checkpoint across replicas, plain folders and hub ids.

Runs its own Serve instance on the session's local Ray (after test_serve.py's, which shuts its own down).
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
from serve_fixtures import Load, free_port, make_tiny_checkpoint, wait_for
from support.hub import REVISION, make_hub_cache, make_plain_folder

pytestmark = pytest.mark.integration

GEN = {"ray_actor_options": {"num_cpus": 0.1}, "health_check_period_s": 2}
INGRESS = {"ray_actor_options": {"num_cpus": 0.05}}


@pytest.fixture(scope="module")
def serve_url(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _deploy(name: str, args: dict, generator: dict | None = None) -> str:
    from ray import serve

    from chatray.serve.app import build_app_with_options

    app = build_app_with_options({"api_key_env": None, "temperature": 0.0, "max_tokens": 8, **args},
                                 {"Ingress": INGRESS, "Generator": {**GEN, **(generator or {})}})
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"/{name}"


def _replica_infos(app: str, want: int, timeout: float = 60) -> dict[str, dict]:
    """``model_info`` of each running Generator replica of ``app``, by replica, asked until ``want`` answered."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name=app)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        info = handle.model_info.remote().result(timeout_s=30)
        seen[info["replica"]] = info
    assert len(seen) == want, f"only {len(seen)} of {want} replicas answered"
    return seen


def _running(app: str) -> int:
    from ray import serve

    return int(serve.status().applications[app].deployments["Generator"].replica_states.get("RUNNING", 0))


def test_every_replica_serves_the_checkpoint_pinned_at_build(serve_url, tmp_path):
    """A better checkpoint written between the first and the second replica's start is not served by either."""
    run = tmp_path / "run-p"
    first = make_tiny_checkpoint(run / "checkpoint_00000001", seed=0)
    prefix = _deploy("pinned", {"checkpoint": f"{run}:best", "step_delay_s": 0.02, "max_tokens": 32}, {
        "max_ongoing_requests": 4,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                               "upscale_delay_s": 0.5, "downscale_delay_s": 600, "look_back_period_s": 1,
                               "metrics_interval_s": 0.5}})
    assert _running("pinned") == 1
    newer = run / "checkpoint_00000002"  # training goes on: a lower eval loss than the served one
    shutil.copytree(first, newer)
    (newer / "metrics.json").write_text(json.dumps({"step": 2, "eval_loss": 1.0}))
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 32, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, Load(
            lambda: http.post(f"{serve_url}{prefix}/v1/chat/completions", json=body).status_code, n=4) as load:
        wait_for(lambda: _running("pinned") == 2, timeout=90, what="a second replica")
    assert load.failures == []
    infos = _replica_infos("pinned", want=2)
    assert {i["resolved_checkpoint"] for i in infos.values()} == {str(first)}
    assert {(i["run"], i["step"], i["eval_loss"]) for i in infos.values()} == {("run-p", 1, 5.0)}
    (model,) = httpx.get(f"{serve_url}{prefix}/v1/models", timeout=30).json()["data"]
    assert (model["id"], model["run"], model["step"], model["eval_loss"]) == ("run-p", "run-p", 1, 5.0)
    reply = httpx.post(f"{serve_url}{prefix}/v1/chat/completions", json=body, timeout=60)
    assert "x-chatray-chat-template" not in reply.headers  # chatray's own checkpoint carries its template
    assert (model["checkpoint"], model["resolved_checkpoint"], model["kind"]) == (f"{run}:best", str(first),
                                                                                    "checkpoint")
    # A redeploy is what moves it to the newer checkpoint.
    _deploy("pinned", {"checkpoint": f"{run}:best"}, {"num_replicas": 1})
    (model,) = httpx.get(f"{serve_url}{prefix}/v1/models", timeout=30).json()["data"]
    assert (model["resolved_checkpoint"], model["step"], model["eval_loss"]) == (str(newer), 2, 1.0)
    from ray import serve

    serve.delete("pinned")


def _greedy(folder, messages: list[dict], max_tokens: int) -> str:
    """The reply the served model must give: chatray's chat template, greedy decoding, run here."""
    from chatray.data.tokenizer import CHAT_TEMPLATE
    from chatray.model import load_model, load_model_tokenizer
    from chatray.serve.engine import GenerationEngine
    from chatray.serve.sampling import SamplingParams

    tok = load_model_tokenizer(folder)
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(load_model(folder), tok, max_batch_size=1)
    return engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0].text


def test_a_plain_folder_and_a_hub_id_are_served_with_chatrays_chat_template(serve_url, tmp_path, monkeypatch):
    import openai

    messages = [{"role": "user", "content": "hello, how are you?"}]
    folder = make_plain_folder(tmp_path / "my-gpt2")
    prefix = _deploy("plain", {"checkpoint": str(folder)})
    (model,) = httpx.get(f"{serve_url}{prefix}/v1/models", timeout=30).json()["data"]
    assert (model["id"], model["kind"], model["resolved_checkpoint"], model["chat_template"]) == (
        "my-gpt2", "folder", str(folder), "chatray-default")
    assert (model["run"], model["step"], model["eval_loss"]) == (None, None, None)
    client = openai.OpenAI(base_url=f"{serve_url}{prefix}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="my-gpt2", messages=messages, max_tokens=8)
    assert raw.headers["x-chatray-chat-template"] == "chatray-default"  # the reply says whose template it used
    assert raw.parse().choices[0].message.content == _greedy(folder, messages, 8)
    with httpx.stream("POST", f"{serve_url}{prefix}/v1/chat/completions", timeout=30,
                      json={"messages": messages, "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-chatray-chat-template"] == "chatray-default"

    # A hub id, from a cache folder the replicas see through HF_HUB_CACHE (here: the app's runtime_env; on a
    # cluster: the nodes' environment).
    cache = tmp_path / "hf" / "hub"
    snapshot = make_hub_cache(cache, "chatray-test/tiny-gpt2", seed=3)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # where the app is built
    env = {"runtime_env": {"env_vars": {"HF_HUB_CACHE": str(cache)}}}
    prefix = _deploy("hub", {"checkpoint": "chatray-test/tiny-gpt2"}, {"ray_actor_options": {"num_cpus": 0.1, **env}})
    (model,) = httpx.get(f"{serve_url}{prefix}/v1/models", timeout=30).json()["data"]
    assert (model["id"], model["kind"], model["resolved_checkpoint"]) == (
        "tiny-gpt2", "hub", f"chatray-test/tiny-gpt2@{REVISION}")
    client = openai.OpenAI(base_url=f"{serve_url}{prefix}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=8)
    assert reply.choices[0].message.content == _greedy(snapshot, messages, 8)
    from ray import serve

    serve.delete("plain")
    serve.delete("hub")


def test_scale_to_zero_then_serve_again(serve_url, tmp_path):
    """``min_replicas: 0``: idle, the Generator goes away; the next request starts one and is answered. A client
    whose request timeout is shorter than that start gets 503 + Retry-After, and its retry is answered."""
    ckpt = make_tiny_checkpoint(tmp_path / "run-z" / "checkpoint_00000001")
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    autoscaling = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
                   "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
                   "look_back_period_s": 1, "metrics_interval_s": 0.5}
    prefix = _deploy("zero", {"checkpoint": str(ckpt)}, {"autoscaling_config": autoscaling})
    url = f"{serve_url}{prefix}/v1/chat/completions"
    assert _running("zero") == 0
    with httpx.Client(timeout=120) as http:
        t0 = time.monotonic()
        first = http.post(url, json=body)
        cold = time.monotonic() - t0
        assert first.status_code == 200, first.text
        print(f"cold start from zero replicas: {cold:.1f}s to the first reply")
        wait_for(lambda: _running("zero") == 0, timeout=60, what="scale down to zero after idle")
        t0 = time.monotonic()
        assert http.post(url, json=body).status_code == 200
        print(f"second cold start: {time.monotonic() - t0:.1f}s")

        # The same app with a request timeout shorter than a replica's start.
        prefix = _deploy("zero", {"checkpoint": str(ckpt), "request_timeout_s": 0.5, "retry_after_s": 2},
                         {"autoscaling_config": autoscaling})
        wait_for(lambda: _running("zero") == 0, timeout=60, what="zero replicas")
        r = http.post(url, json=body)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "no_replica"
        wait_for(lambda: http.post(url, json=body).status_code == 200, timeout=60, interval=2,
                 what="the retry to be answered once the replica is up")
    from ray import serve

    serve.delete("zero")
