"""One `ray start --head` cluster on 127.0.0.1 for the e2e tests (token auth on, fake credentials in its
environment), stopped at the end.

The teardown stops only this cluster's processes (those of its Ray temp dir, chatray.localcluster), never
plain `ray stop`: a demo cluster, a notebook's ray.init() or another test run on the machine keep running.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
FAULT_STEP = 12  # a training worker of the e2e run exits at this step (once), see chatray.train.loop
# Fake credentials in the environment of `ray start` and of the clients, as on a real cluster: no job or app spec
# may carry them (test_secrets.py), and the Serve apps deployed here get an API key (CHATRAY_API_KEY).
FAKE_SECRETS = {"AWS_SECRET_ACCESS_KEY": "e2e-fake-aws-secret-3f9c1a", "HF_TOKEN": "hf_e2eFakeToken7b2d",
                "CHATRAY_API_KEY": "e2e-fake-api-key-51c8e0"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """Yields dict(address, dashboard, env, home): a head node started with `ray start --head`."""
    from chatray.localcluster import LocalCluster, start_local_cluster, stop_local_cluster
    from chatray.rayenv import ray_auth_env

    home = tmp_path_factory.mktemp("chatray-home")
    os.environ["CHATRAY_HOME"] = str(home)  # the up/down state file of this cluster, not the user's
    cluster = LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), agent_port=free_port())
    temp_dir = tempfile.mkdtemp(prefix="cr-e2e-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        cluster, started = start_local_cluster(
            cluster, num_cpus=2, temp_dir=temp_dir,
            # Workers inherit the raylet's environment: the fault-injection hook reaches the training workers.
            extra_env={"CHATRAY_FAULT_AT_STEP": str(FAULT_STEP), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", **FAKE_SECRETS})
        assert started, "a Ray cluster was already answering on the e2e ports"
        env = {**ray_auth_env(), **FAKE_SECRETS}
        env["RAY_ADDRESS"] = cluster.dashboard_url
        env.pop("CHATRAY_FAULT_AT_STEP", None)
        yield {"address": cluster.address, "dashboard": cluster.dashboard_url, "env": env, "home": home,
               "cluster": cluster, "fault_step": FAULT_STEP, "free_port": free_port, "secrets": FAKE_SECRETS}
    finally:
        # Only this cluster's processes (its temp dir), also when start failed half-way.
        stop_local_cluster(force=True, cluster=cluster, grace_s=6.0)
        os.environ.pop("CHATRAY_HOME", None)
