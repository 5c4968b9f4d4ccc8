"""A Ray that chatray starts in-process (``chatray serve`` / ``train`` / ``data prepare`` without RAY_ADDRESS, all
through :func:`chatray.rayenv.connect`) listens on loopback only, Serve's proxy and replicas included."""

from __future__ import annotations

import os

import psutil
import pytest
from support.ports import free_port
from support.serve_probe import probe_running
from support.sockets import assert_loopback_only, listeners

pytestmark = pytest.mark.integration


def test_a_ray_that_connect_starts_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "CHATRAY_RAY_HOST", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.pop("RAY_AUTH_MODE", None)  # the auth mode of the Ray it starts is Ray's choice, as for `chatray serve`
    with probe_running(env, free_port()) as driver:
        # ray.init() starts the GCS, raylet, dashboard agent, ... as children of the driver; workers (Serve's
        # proxy, controller and replicas) are the raylet's children.
        root = psutil.Process(driver.pid)
        procs = [root, *root.children(recursive=True)]
        found = listeners(procs)
    assert_loopback_only(found, serve_replicas=2)
