"""The cluster that `chatray up` / `make demo` start (`ray start --head`, chatray.localcluster) listens on loopback
only: GCS, raylet, dashboard and its agents, Ray Client, Serve's proxy, controller and replicas.

Its own cluster, not the session's ``ray_head``: Serve's HTTP options are fixed by the first app on a cluster.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from support.ports import free_port
from support.serve_probe import probe_running
from support.sockets import assert_loopback_only, listeners, report

from chatray.localcluster import LocalCluster, cluster_processes, start_local_cluster, stop_local_cluster
from chatray.rayenv import ray_auth_env

pytestmark = pytest.mark.e2e


def test_the_local_cluster_listens_on_loopback_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRAY_HOME", str(tmp_path / "home"))
    for key in ("CHATRAY_RAY_HOST", "CHATRAY_DASHBOARD_HOST", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(key, raising=False)
    temp = Path(tempfile.mkdtemp(prefix="cr-lo-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), agent_port=free_port(),
                           client_port=free_port(), temp_dir=str(temp))
    try:
        cluster, started = start_local_cluster(cluster, num_cpus=2, wait_s=120)
        assert started
        # A client as chatray's commands are, through connect(): RAY_ADDRESS=127.0.0.1:port and token auth,
        # nothing else (not the env file), so connect() itself must keep Ray on 127.0.0.1.
        env = {k: v for k, v in ray_auth_env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env["RAY_ADDRESS"] = cluster.address
        with probe_running(env, free_port()) as driver:
            procs = cluster_processes(temp)
            root = psutil.Process(driver.pid)
            found = listeners([*procs, root, *root.children(recursive=True)])
        names = {item.name for item in found}
        assert any("ray.util.client.server" in n for n in names), report(found)
        assert any(item.port == cluster.dashboard_port for item in found), report(found)
        assert_loopback_only(found, serve_replicas=2)
    finally:
        stop_local_cluster(cluster=cluster, force=True, grace_s=6.0)
        shutil.rmtree(temp, ignore_errors=True)
