"""chatray's Serve data plane settings: defaults that never override what the environment says."""

from __future__ import annotations

import os
import subprocess
import sys

from chatray.localcluster import LocalCluster
from chatray.localcluster.start import ray_start_env
from chatray.rayenv import SERVE_ENV, apply_serve_env, serve_env


def test_serve_env_adds_the_defaults_and_keeps_the_callers_values():
    assert serve_env({"PATH": "/bin"}) == {"PATH": "/bin", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
    # The user's choice wins: Ray's stock data plane.
    assert serve_env({"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}) == {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}


def test_apply_serve_env_sets_only_what_is_missing():
    environ = {"OTHER": "x"}
    apply_serve_env(environ)
    assert environ == {"OTHER": "x", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
    environ = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}
    apply_serve_env(environ)
    assert environ == {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}


def test_ray_start_of_the_local_cluster_gets_them(monkeypatch):
    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    env = ray_start_env(LocalCluster())
    assert {k: env[k] for k in SERVE_ENV} == SERVE_ENV
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    assert ray_start_env(LocalCluster())["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"


def test_the_installed_ray_serve_reads_the_setting():
    """The variable is internal to Ray Serve: fail here, not silently, if an upgrade stops reading it."""
    code = ("from ray.serve._private import constants as c, handle_options as h; "
            "print(c.RAY_SERVE_USE_GRPC_BY_DEFAULT, c.RAY_SERVE_PROXY_USE_GRPC, "
            "h.DynamicHandleOptions()._by_reference)")

    def run(value: str) -> str:
        env = {**os.environ, "RAY_SERVE_USE_GRPC_BY_DEFAULT": value}
        env.pop("RAY_SERVE_PROXY_USE_GRPC", None)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              check=True).stdout.split()

    assert run(SERVE_ENV["RAY_SERVE_USE_GRPC_BY_DEFAULT"]) == ["True", "True", "False"]  # proxy and handles on gRPC
    assert run("0") == ["False", "False", "True"]  # Ray's stock data plane: actor calls, by reference
