"""The cluster that `chatray up` / `make demo` start (`ray start --head`, chatray.localcluster; with or without worker
nodes) listens on loopback only: GCS, raylets, dashboard and its agents, Ray Client, Serve's proxy, controller and
replicas.

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
from support.sockets import assert_loopback_only, exposed_listeners, listeners, report

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


def _gone(p: psutil.Process) -> bool:
    """Exited (a zombie has exited; whoever adopted it just has not reaped it)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_up_with_a_worker_node_keeps_both_on_loopback_and_down_stops_both(tmp_path):
    """`chatray up --workers 1`: a head and a second raylet on this machine, each with its own CPUs, every listener of
    both on loopback; `chatray down` stops both."""
    import subprocess
    import sys
    import time

    from chatray.localcluster.settings import NODE_ENV

    temp = Path(tempfile.mkdtemp(prefix="cr-up2-", dir="/tmp"))
    dropped = ("CHATRAY_RAY_HOST", "CHATRAY_DASHBOARD_HOST", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    env = {k: v for k, v in ray_auth_env().items() if k not in dropped}
    env.update(CHATRAY_HOME=str(tmp_path / "home"), CHATRAY_RAY_TEMP_DIR=str(temp), CHATRAY_RAY_PORT=str(free_port()),
               CHATRAY_DASHBOARD_PORT=str(free_port()), CHATRAY_DASHBOARD_AGENT_PORT=str(free_port()),
               CHATRAY_RAY_CLIENT_PORT=str(free_port()))
    cluster = LocalCluster.from_env(env)
    chatray = [sys.executable, "-m", "chatray.cli"]
    try:
        t0 = time.monotonic()
        up = subprocess.run([*chatray, "up", "--num-cpus", "1", "--workers", "1"], env=env, capture_output=True,
                            text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        assert "worker node joined: 2 nodes alive" in up.stdout
        print(f"chatray up --workers 1: {time.monotonic() - t0:.1f} s")
        procs = cluster_processes(temp)
        raylets = [p for p in procs if p.name() == "raylet"]
        assert len(raylets) == 2
        on_worker = [p for p in raylets if p.environ().get(NODE_ENV) == "worker-1"]
        assert len(on_worker) == 1 and "--head" not in on_worker[0].cmdline()
        assert all(any(a.startswith("--static_resource_list=") and ",CPU,1," in a for a in p.cmdline())
                   for p in raylets), "each node offers its own CPU"
        found = listeners(procs)
        assert sum(1 for item in found if item.name == "raylet") >= 4, report(found)  # 2 ports per raylet
        exposed, _tolerated = exposed_listeners(found)
        assert not exposed, "listening on a non-loopback address:\n" + report(exposed)
        down = subprocess.run([*chatray, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not cluster_processes(temp), "down stops both nodes"
        assert all(_gone(p) for p in raylets)
    finally:
        stop_local_cluster(cluster=cluster, force=True, grace_s=6.0)
        shutil.rmtree(temp, ignore_errors=True)
