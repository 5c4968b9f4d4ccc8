"""The files a local cluster leaves for others: the state file that records each cluster chatray started (by temp
dir, so ``chatray down`` stops only those) and the env file clients ``source`` to reach a cluster.

State file (``$CHATRAY_HOME/local-cluster.json``)::

    {"clusters": {"<temp dir>": {<LocalCluster fields>, "address": ..., "dashboard": ..., "started_at": ...}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from chatray.localcluster.settings import LocalCluster, state_file
from chatray.rayenv import ray_host_env, token_location

__all__ = [
    "clear_cluster_files",
    "cluster_from_record",
    "describe_cluster",
    "read_state",
    "record_cluster",
    "write_env_file",
]


def read_state() -> dict[str, dict[str, Any]]:
    """{temp dir: record} of the clusters chatray started; {} when there is no (readable) state file."""
    try:
        data = json.loads(state_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    clusters = data.get("clusters") if isinstance(data, dict) else None
    return clusters if isinstance(clusters, dict) else {}  # a file not written by chatray records nothing


def _write_state(clusters: dict[str, dict[str, Any]]) -> None:
    path = state_file()
    if not clusters:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # replaced in one step: a reader never sees half a file
    tmp.write_text(json.dumps({"clusters": clusters}, indent=2), encoding="utf-8")
    tmp.replace(path)


def record_cluster(cluster: LocalCluster, **extra: Any) -> None:
    """Record in the state file that chatray started ``cluster`` (its addresses, plus ``extra`` fields)."""
    clusters = read_state()
    key = str(cluster.ray_temp_dir)
    clusters[key] = {**clusters.get(key, {}), **asdict(cluster), "temp_dir": key, "address": cluster.address,
                     "dashboard": cluster.dashboard_url, **extra}
    _write_state(clusters)


def cluster_from_record(record: Mapping[str, Any]) -> LocalCluster:
    """The :class:`LocalCluster` a state-file record describes."""
    names = {f.name for f in fields(LocalCluster)}
    return LocalCluster(**{k: v for k, v in record.items() if k in names})


def clear_cluster_files(cluster: LocalCluster) -> None:
    """Forget ``cluster`` in the state file and delete its env file and Ray's pointer to it."""
    clusters = read_state()
    if clusters.pop(str(cluster.ray_temp_dir), None) is not None:
        _write_state(clusters)
    cluster.env_file.unlink(missing_ok=True)
    (cluster.ray_temp_dir / "ray_current_cluster").unlink(missing_ok=True)


def write_env_file(cluster: LocalCluster) -> Path:
    """Write :attr:`LocalCluster.env_file`: token auth on, the cluster's addresses and Ray's local-only switch (a
    client without it swaps 127.0.0.1 for the machine's IP, where a loopback cluster does not listen), for clients
    to ``source``."""
    path = cluster.env_file
    path.parent.mkdir(parents=True, exist_ok=True)
    switch = "".join(f"export {k}={v}\n" for k, v in ray_host_env(cluster.host).items())
    path.write_text(
        "# Written by chatray (chatray up, cluster/local/start.sh): `source` this file to point Ray's CLIs and SDKs\n"
        "# at the local cluster.\n"
        "export RAY_AUTH_MODE=token\n"
        f"{switch}"
        f"export RAY_ADDRESS={cluster.address}\n"
        f"export RAY_API_SERVER_ADDRESS={cluster.dashboard_url}\n"
        f"export RAY_DASHBOARD_ADDRESS={cluster.dashboard_url}\n", encoding="utf-8")
    return path


def describe_cluster(cluster: LocalCluster, stop_command: str = "chatray down") -> str:
    """How to reach ``cluster``: address, dashboard, where the token is, the env file for clients, its files."""
    url, temp = cluster.dashboard_url, cluster.ray_temp_dir
    return (
        f"Ray cluster:   {cluster.address}     (ray status, after the `source` below)\n"
        f"Dashboard:     {url}   (also the Jobs API and Serve's REST API)\n"
        f"Token auth:    on; the token is in {token_location()} (print it: ray get-auth-token).\n"
        "               The dashboard asks for it in the browser. CLI/SDK clients need RAY_AUTH_MODE=token:\n"
        f"                 source {cluster.env_file}\n"
        f"                 ray job submit --address {url} -- python -c 'print(1)'\n"
        f"                 serve deploy serve_config.yaml --address {url}\n"
        f"Ray files:     {temp} (logs: {temp}/session_latest/logs)\n"
        f"Stop:          {stop_command}")
