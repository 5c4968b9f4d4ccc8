"""`chatray serve status` without a cluster: PromQL's histogram_quantile, the text format, windows, the screen."""

from __future__ import annotations

import math

import httpx
import pytest

from chatray.errors import ChatrayError
from chatray.serve.status import (
    AppStatus,
    StatusReport,
    format_status,
    histogram_quantile,
    parse_metrics,
    prometheus_window,
    scrape_window,
)

INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket_like_promql():
    # 10 observations: 2 in (0, 0.1], 6 in (0.1, 0.5], 2 in (0.5, 1]
    buckets = [(0.1, 2), (0.5, 8), (1.0, 10), (INF, 10)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (5 - 2) / 6)  # rank 5 in the 2nd bucket
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.1)  # rank 2: the top of the first bucket
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * (9.9 - 8) / 2)
    assert histogram_quantile(0.5, list(reversed(buckets))) == histogram_quantile(0.5, buckets)  # any order


def test_histogram_quantile_edges():
    assert histogram_quantile(0.5, [(0.1, 0), (INF, 0)]) is None  # nothing observed
    assert histogram_quantile(0.5, [(0.1, 1)]) is None  # no +Inf bucket: not a histogram
    assert histogram_quantile(0.99, [(0.1, 1), (1.0, 1), (INF, 5)]) == 1.0  # in +Inf: the highest finite bound
    # cumulative counts that dip (summed series, rounding) are made monotonic first
    assert histogram_quantile(0.5, [(0.1, 4), (0.5, 3.9), (INF, 8)]) == pytest.approx(0.1 * 4 / 4)


TEXT = """\
# HELP ray_chatray_generation_tokens_total Number of generation tokens processed.
# TYPE ray_chatray_generation_tokens_total counter
ray_chatray_generation_tokens_total{application="main",model_name="m \\"q\\"",replica="r1"} 100.0
ray_chatray_generation_tokens_total{application="main",model_name="m \\"q\\"",replica="r2"} 50.0
ray_chatray_num_requests_running{application="main",model_name="m \\"q\\"",replica="r1"} 3.0
ray_chatray_num_requests_running{application="main",model_name="m \\"q\\"",replica="r2"} 1.0
ray_chatray_num_requests_waiting{application="main",model_name="m \\"q\\"",replica="r1"} 2.0
ray_chatray_time_to_first_token_seconds_bucket{application="main",le="0.1",replica="r1"} 10.0
ray_chatray_time_to_first_token_seconds_bucket{application="main",le="1.0",replica="r1"} 20.0
ray_chatray_time_to_first_token_seconds_bucket{application="main",le="+Inf",replica="r1"} 20.0
ray_serve_deployment_replica_healthy{application="main",deployment="Generator",replica="r1"} 1.0
"""


def test_parse_metrics_keeps_the_prefix_and_unescapes_labels():
    samples = parse_metrics(TEXT, "ray_chatray_")
    assert len(samples) == 8
    assert samples[0].name == "ray_chatray_generation_tokens_total" and samples[0].value == 100.0
    assert samples[0].label("model_name") == 'm "q"' and samples[0].label("replica") == "r1"
    assert samples[-1].label("le") == "+Inf"
    assert len(parse_metrics(TEXT)) == 9


def test_scrape_window_takes_differences_and_sums_replicas():
    before = parse_metrics(TEXT.replace("} 100.0", "} 40.0").replace("} 20.0", "} 0.0").replace("} 10.0", "} 0.0"))
    after = parse_metrics(TEXT)
    # r2 restarted between the scrapes (its counter fell): it counts from zero
    before = [s if s.label("replica") != "r2" or "tokens" not in s.name else s.__class__(s.name, s.labels, 70.0)
              for s in before]
    apps = scrape_window(before, after, seconds=10.0)
    main = apps["main"]
    assert main.model == 'm "q"'
    assert (main.running, main.waiting) == (4.0, 2.0)
    assert main.tokens_per_s == pytest.approx((100 - 40 + 50) / 10)
    assert main.ttft[0] == pytest.approx(0.1) and main.ttft[1] == pytest.approx(0.1 + 0.9 * (19.8 - 10) / 10)
    assert main.itl == (None, None)  # no ITL series in the window
    assert scrape_window(after, after, 10.0)["main"].tokens_per_s == 0.0


def test_format_status_is_one_table_saying_where_the_numbers_come_from():
    report = StatusReport("2 scrapes of 1 Ray metrics endpoint(s) 10 s apart", 10.0, [
        AppStatus("chatray", "tiny-demo", {"RUNNING": 2, "STARTING": 1}, 3, 0, 412.54, (0.0312, 1.5), (0.008, 0.01)),
        AppStatus("idle", "", {}, None, None, None),
    ])
    lines = format_status(report).splitlines()
    assert lines[0] == "chatray serve status: the last 10 s, from 2 scrapes of 1 Ray metrics endpoint(s) 10 s apart"
    assert lines[2].split() == ["APPLICATION", "MODEL", "REPLICAS", "RUNNING", "WAITING", "TOKENS/S", "TTFT", "P50",
                                "TTFT", "P99", "ITL", "P50", "ITL", "P99"]
    assert lines[3].split() == ["chatray", "tiny-demo", "2", "RUNNING,", "1", "STARTING", "3", "0", "412.5",
                                "31.2", "ms", "1.50", "s", "8.0", "ms", "10.0", "ms"]
    assert lines[4].split() == ["idle"] + ["-"] * 9
    assert len({len(line) for line in lines[2:]}) == 1  # aligned columns
    assert "(no chatray application" in format_status(StatusReport("x", 60, []))


def test_prometheus_window_asks_promql_and_fills_each_application():
    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        asked.append(query)
        value = "NaN" if "ray_chatray_inter_token_latency_seconds" in query else "0.25"
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"application": "main", "model_name": "m"}, "value": [0, value]}]}})

    transport = httpx.MockTransport(answer)
    real = httpx.Client

    def client(*args, **kwargs):
        return real(*args, transport=transport, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "Client", client)
        apps = prometheus_window("http://prom:9090", 60)
    main = apps["main"]
    assert (main.model, main.running, main.waiting, main.tokens_per_s) == ("m", 0.25, 0.25, 0.25)
    assert main.ttft == (0.25, 0.25) and main.itl == (None, None)  # NaN: no observation in the window
    assert "sum by (application, model_name) (rate(ray_chatray_generation_tokens_total[60s]))" in asked
    assert ("histogram_quantile(0.99, sum by (application, model_name, le) "
            "(rate(ray_chatray_time_to_first_token_seconds_bucket[60s])))") in asked

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx, "Client", lambda *a, **k: real(*a, transport=httpx.MockTransport(down), **k))
        with pytest.raises(ChatrayError, match="Prometheus at http://prom:9090 did not answer"):
            prometheus_window("http://prom:9090", 60)


def test_status_without_a_ray_cluster_is_one_clear_line(monkeypatch):
    from click.testing import CliRunner

    import chatray.rayenv
    from chatray.cli import cli

    def no_ray(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(chatray.rayenv, "connect", no_ray)
    result = CliRunner().invoke(cli, ["serve", "status"])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: cannot connect to Ray: Could not find any running Ray instance.",
                                          "hint: pass --address, or start a cluster (chatray up)"]
