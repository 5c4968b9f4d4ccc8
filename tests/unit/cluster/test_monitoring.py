"""What ships for monitoring agrees with the series chatray exports: the Grafana dashboard's PromQL, the KubeRay
pods' metrics port and its PodMonitor, and the launcher's Prometheus config (Ray's service discovery file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from chatray.serve.metrics import SPECS

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "cluster" / "grafana" / "chatray.json"
KUBERAY = REPO / "cluster" / "kuberay"

# The names on Ray's metrics endpoint: chatray's (a histogram's samples add suffixes) and the one Serve series used.
SERVE_REPLICAS = "ray_serve_deployment_replica_healthy"
EXPORTED = {SERVE_REPLICAS} | {
    spec.exported + suffix for spec in SPECS.values()
    for suffix in (("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",))}
# Labels a panel may group or filter by: chatray's, Serve's, and a histogram's le.
LABELS = {label for spec in SPECS.values() for label in spec.labels} | {"application", "deployment", "replica", "le"}


def _exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_every_panel_queries_series_chatray_or_serve_exports():
    exprs = _exprs()
    assert exprs
    for title, expr in exprs:
        names = set(re.findall(r"\b(ray_[a-z0-9_]+)", expr))
        assert names and names <= EXPORTED, f"{title}: {expr} names {names - EXPORTED or 'no series'}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= LABELS, f"{title}: {expr}"
        for label in re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr):
            assert label in LABELS, f"{title}: {expr}"


def test_the_dashboard_charts_ttft_itl_throughput_queue_replicas_and_every_series():
    text = " ".join(expr for _, expr in _exprs())
    titles = {title for title, _ in _exprs()}
    assert {"Time to first token", "Inter-token latency", "Tokens per second", "Requests running and waiting",
            "Queue time", "Generator replicas", "KV cache usage", "Rejected requests"} <= titles
    for spec in SPECS.values():
        assert spec.exported in text, f"no panel shows {spec.exported}"
    assert SERVE_REPLICAS in text
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert re.findall(r"\b(ray_[a-z0-9_]+)", variables["application"]["definition"])[0] in EXPORTED
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_kuberay_pods_expose_ray_metrics_where_the_podmonitor_looks():
    monitor = yaml.safe_load((KUBERAY / "monitoring" / "podmonitor.yaml").read_text(encoding="utf-8"))
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for manifest in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((KUBERAY / manifest).read_text(encoding="utf-8"))
        spec = {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
                "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            port = group["rayStartParams"]["metrics-export-port"]
            meta = group["template"]["metadata"]
            assert selector.items() <= meta["labels"].items(), manifest
            assert meta["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": port}, manifest
            ray = group["template"]["spec"]["containers"][0]
            ports = {p["name"]: str(p["containerPort"]) for p in ray["ports"]}
            assert ports[endpoint["port"]] == port == "8080", manifest


def test_launcher_prometheus_reads_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((REPO / "cluster" / "launcher" / "prometheus.yaml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (files,) = job["file_sd_configs"]
    assert files["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    launcher = yaml.safe_load((REPO / "cluster" / "launcher" / "chatray-aws.yaml").read_text(encoding="utf-8"))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--metrics-export-port=8080" in launcher[key][-1], key
