"""chatray's Serve data plane settings: defaults that never override what the environment says."""

from __future__ import annotations

from chatray.localcluster import LocalCluster, _ray_env
from chatray.serve.dataplane import SERVE_ENV, apply_serve_env, serve_env


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
    env = _ray_env(LocalCluster())
    assert {k: env[k] for k in SERVE_ENV} == SERVE_ENV
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    assert _ray_env(LocalCluster())["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
