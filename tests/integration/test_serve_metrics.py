"""Serving metrics for real: known traffic through the HTTP API, then Ray's metrics endpoint is scraped.

One application of its own (``metrics-it``, one Generator replica, an API key and a 4 KiB body limit), so that no
other test's traffic lands in its series: every count is compared with exactly what was sent. Ray's agents export
every ``metrics_report_interval_ms`` (10 s by default): the test polls the endpoint until the counts settle.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest
from serve_fixtures import free_port, make_tiny_checkpoint

pytestmark = pytest.mark.integration

APP, MODEL, KEY = "metrics-it", "mx-model", "mx-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from chatray.serve.app import build_app_with_options

    root = tmp_path_factory.mktemp("serve-metrics")
    ckpt = make_tiny_checkpoint(root / "run" / "checkpoint_00000001", seed=0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    key_file = root / "api_key"  # the Ingress replica reads it (no secret in the app's spec)
    key_file.write_text(KEY + "\n", encoding="utf-8")
    app = build_app_with_options(
        {"checkpoint": str(ckpt), "api_key_file": str(key_file), "model_name": MODEL, "temperature": 0.0,
         "max_tokens": 8, "max_body_bytes": 4096},
        {"Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
         "Generator": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(app, name=APP, route_prefix="/mx")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/mx", timeout=60)
    try:
        yield client
    finally:
        client.close()
        serve.shutdown()


def _metrics_port() -> int:
    import ray

    ports = [n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]
    assert len(ports) == 1 and ports[0], ray.nodes()
    return ports[0]


def _scrape(port: int) -> list:
    from chatray.serve.status import parse_metrics

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for s in parse_metrics(text, "ray_chatray_") if s.label("application") == APP]


def _sum(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.label(k) == v for k, v in labels.items()))


def _send_known_traffic(client: httpx.Client) -> tuple[Counter, int, int, Counter]:
    """Completions (whole and streamed) and rejected requests; returns what the server said it did:
    (finish reasons, prompt tokens, completion tokens, rejections by (status, reason))."""
    reasons, prompt_tokens, completion_tokens = Counter(), 0, 0

    def record(choice_reason: str, usage: dict) -> None:
        nonlocal prompt_tokens, completion_tokens
        reasons[choice_reason] += 1
        prompt_tokens += usage["prompt_tokens"]
        completion_tokens += usage["completion_tokens"]

    first_text = ""
    for i in range(3):  # whole replies, exactly max_tokens each (ignore_eos)
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": f"hello {i}", "max_tokens": 6,
                                                               "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        first_text = first_text or body["choices"][0]["text"]
        record(body["choices"][0]["finish_reason"], body["usage"])
    for i in range(2):  # streamed chat replies, usage in the last chunk
        with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
                "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 5, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        finish = next(c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason"))
        record(finish, events[-1]["usage"])
    # Greedy is deterministic: a character of the first reply, as a stop string, ends the same request early.
    stop = next(ch for ch in first_text if not ch.isspace())
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "hello 0", "max_tokens": 6, "ignore_eos": True,
                                                           "stop": [stop]})
    assert r.json()["choices"][0]["finish_reason"] == "stop", r.text
    record("stop", r.json()["usage"])

    rejected = Counter()
    for r in (client.post("/v1/completions", json={"prompt": "x"}),  # no key
              client.post("/v1/completions", headers={"Authorization": "Bearer wrong"}, json={"prompt": "x"}),
              client.post("/v1/completions", headers=AUTH, json={"prompt": "x" * 5000}),  # over 4 KiB
              client.post("/v1/completions", headers=AUTH, content=b"{not json"),
              client.post("/v1/completions", headers=AUTH, json={"prompt": "x", "temperature": 9}),
              client.post("/v1/completions", headers=AUTH, json={"prompt": "x " * 300, "max_tokens": 8})):
        assert r.status_code in (400, 401, 413), r.text
        err = r.json()["error"]
        rejected[(str(r.status_code), err["code"] or err["type"])] += 1
    assert {s for s, _ in rejected} == {"400", "401", "413"}
    return reasons, prompt_tokens, completion_tokens, rejected


def test_each_series_is_exported_and_counts_what_was_sent(served):
    port = _metrics_port()
    reasons, prompt_tokens, completion_tokens, rejected = _send_known_traffic(served)
    requests = sum(reasons.values())
    assert reasons["length"] == 5 and reasons["stop"] == 1

    def settled(samples: list) -> bool:
        return (_sum(samples, "ray_chatray_request_success_total") == requests
                and _sum(samples, "ray_chatray_generation_tokens_total") == completion_tokens
                and _sum(samples, "ray_chatray_request_rejected_total") == sum(rejected.values())
                and _sum(samples, "ray_chatray_num_requests_running") == 0)

    deadline, samples = time.monotonic() + 90, []
    while time.monotonic() < deadline and not settled(samples):
        time.sleep(1)
        samples = _scrape(port)
    seen = {n: _sum(samples, n) for n in ("ray_chatray_request_success_total", "ray_chatray_generation_tokens_total",
                                          "ray_chatray_request_rejected_total", "ray_chatray_num_requests_running")}
    assert settled(samples), (seen, requests, completion_tokens, rejected)

    # The counters match exactly what was sent.
    for reason in ("stop", "length"):
        assert _sum(samples, "ray_chatray_request_success_total", finished_reason=reason) == reasons[reason]
    assert _sum(samples, "ray_chatray_prompt_tokens_total") == prompt_tokens
    assert _sum(samples, "ray_chatray_generation_tokens_total") == completion_tokens
    for (status, reason), n in rejected.items():
        assert _sum(samples, "ray_chatray_request_rejected_total", status=status, reason=reason) == n, (status, reason)
    # One TTFT, queue time and e2e latency per request, one inter-token gap per token after the first.
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert _sum(samples, f"ray_chatray_{name}_count") == requests, name
        assert _sum(samples, f"ray_chatray_{name}_bucket", le="+Inf") == requests, name
    assert _sum(samples, "ray_chatray_inter_token_latency_seconds_count") == completion_tokens - requests
    assert _sum(samples, "ray_chatray_e2e_request_latency_seconds_sum") > 0

    # Every series is there, labelled with the model and, by Serve, the deployment, replica and application.
    names = {s.name for s in samples}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 *(f"{h}_{part}" for h in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                           "e2e_request_latency_seconds", "request_queue_time_seconds")
                   for part in ("bucket", "sum", "count"))):
        assert f"ray_chatray_{name}" in names, name
    for s in samples:
        assert s.label("model_name") == MODEL and s.label("replica"), s
        want = "Ingress" if s.name == "ray_chatray_request_rejected_total" else "Generator"
        assert s.label("deployment") == want, s
    # vLLM's bucket boundaries.
    les = {float(s.label("le")) for s in samples if s.name == "ray_chatray_time_to_first_token_seconds_bucket"}
    assert min(les) == 0.001 and max(x for x in les if x != float("inf")) == 2560.0


def test_serve_status_reads_replicas_and_the_window_from_the_metrics(served):
    from click.testing import CliRunner

    from chatray.cli import cli

    stop = threading.Event()

    def load() -> None:  # traffic during the whole window, so tokens/s and latencies have data
        while not stop.is_set():
            served.post("/v1/completions", headers=AUTH, json={"prompt": "load", "max_tokens": 8,
                                                               "ignore_eos": True})

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        result = CliRunner().invoke(cli, ["serve", "status", "--window", "10"], catch_exceptions=False)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert result.exit_code == 0, result.output
    # (the session's Ray prints its workers' logs on this process's stdout too: pick the status lines out)
    lines = result.output.splitlines()
    head = next(line for line in lines if line.startswith("chatray serve status:"))
    assert head.endswith("from 2 scrapes of 1 Ray metrics endpoint(s) 10 s apart"), head
    row = next(line.split() for line in lines if line.startswith(APP))
    # APPLICATION MODEL REPLICAS(n RUNNING) RUNNING WAITING TOKENS/S TTFT p50 (value unit) ...
    assert row[:4] == [APP, MODEL, "1", "RUNNING"], row
    assert float(row[6]) > 0, row  # tokens/s
    assert row[7] != "-" and row[11] != "-", row  # TTFT p50 and ITL p50 were measured
