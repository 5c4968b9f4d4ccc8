"""A real `ray start --head` (chatray.localcluster) is stopped without touching any other process on the machine.

Its own cluster, not the session's ``ray_head``: start, record, stop by temp dir, forget.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.ports import free_port

from chatray.localcluster import (
    MARKER_ENV,
    LocalCluster,
    cluster_processes,
    start_local_cluster,
    stop_local_cluster,
)
from chatray.localcluster.probes import port_open
from chatray.localcluster.processes import psutil_module
from chatray.localcluster.settings import state_file
from chatray.rayenv import SERVE_ENV

pytestmark = pytest.mark.e2e


def test_start_then_stop_only_the_clusters_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRAY_HOME", str(tmp_path / "home"))
    # Not inherited from this process (conftest sets it here): the cluster must get it from localcluster itself.
    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    # Short, outside tmp_path: Ray's socket paths under the temp dir have a length limit.
    temp = Path(tempfile.mkdtemp(prefix="cr-lc-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    # Bystanders: an unrelated process, and one of another chatray cluster naming its dirs as Ray's processes do.
    bystanders = [subprocess.Popen(["sleep", "300"], env=env),
                  subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                    f"--temp-dir={temp}-other", f"--session-dir={temp}-other/session_x"],
                                   env={**env, MARKER_ENV: f"{temp}-other"})]
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), agent_port=free_port(),
                           client_port=free_port(), temp_dir=str(temp))
    try:
        t = time.monotonic()
        cluster, started = start_local_cluster(cluster, num_cpus=1, wait_s=90)
        print(f"started in {time.monotonic() - t:.0f} s")
        assert started and port_open(cluster.host, cluster.gcs_port)
        assert str(temp) in state_file().read_text()
        assert "RAY_AUTH_MODE=token" in cluster.env_file.read_text()
        procs = cluster_processes(temp)
        names = {p.name() for p in procs}
        assert {"gcs_server", "raylet"} <= names, names
        # chatray's Serve data plane reaches the cluster: Serve's processes inherit the raylet's environment.
        raylet_env = next(p for p in procs if p.name() == "raylet").environ()
        assert {k: raylet_env.get(k) for k in SERVE_ENV} == SERVE_ENV
        assert not {b.pid for b in bystanders} & {p.pid for p in procs}

        t = time.monotonic()
        lines = stop_local_cluster(cluster=cluster, grace_s=6.0)  # recorded: no --force needed
        print(f"stopped in {time.monotonic() - t:.0f} s: {lines}")
        psutil = psutil_module()
        assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert cluster_processes(temp) == []
        assert not port_open(cluster.host, cluster.gcs_port)
        assert not state_file().exists() and not cluster.env_file.exists()
        assert all(b.poll() is None for b in bystanders), "a process outside the cluster was stopped"
    finally:
        stop_local_cluster(cluster=cluster, force=True, grace_s=3.0)  # a no-op unless the test failed above
        for b in bystanders:
            b.kill()
            b.wait()
        shutil.rmtree(temp, ignore_errors=True)
