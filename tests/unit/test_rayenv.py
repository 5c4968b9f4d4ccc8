"""What chatray puts into Ray's environment: Serve's data plane settings (defaults that never override what the
environment says), where a Ray it starts listens (loopback unless CHATRAY_RAY_HOST says otherwise), and the
variables forwarded to Ray workers (settings yes, secrets only by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from chatray.errors import ChatrayError
from chatray.localcluster import LocalCluster
from chatray.localcluster.start import ray_start_env
from chatray.rayenv import (
    SECRET_NAMES,
    SERVE_ENV,
    apply_ray_host,
    apply_serve_env,
    connect,
    forward_warning,
    forwarded_env,
    is_loopback,
    is_secret,
    ray_host_env,
    serve_env,
)

# A driver's environment: settings workers need, credentials they must get from their own node, and the rest.
DRIVER_ENV = {
    "AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://minio:9000",
    "AWS_PROFILE": "train", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
    "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/credentials", "HF_TOKEN_PATH": "/etc/hf/token",
    "HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "CHATRAY_CACHE": "/cache/chatray", "CHATRAY_S3_ENDPOINT": "http://minio:9000",
    # secrets
    "AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_SESSION_TOKEN": "fake-session",
    "HF_TOKEN": "hf_fake", "CHATRAY_API_KEY": "fake-api-key", "CHATRAY_DB_PASSWORD": "pw", "HF_HUB_TOKEN": "hf_2",
    "CHATRAY_Auth_Header": "Bearer x", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    # not chatray's to forward
    "PATH": "/usr/bin", "HOME": "/home/me", "GITHUB_TOKEN": "ghp_fake",
}


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


# ---------------------------------------------------------------------------------------------------------------
# Where a Ray that chatray starts listens


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]", " 127.0.0.1 "])
def test_loopback_hosts(host):
    assert is_loopback(host)
    assert ray_host_env(host) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's local-only mode


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.168.1.5", "10.0.0.1", "fe80::1", "myhost.lan", ""])
def test_other_hosts_are_exposed(host):
    assert not is_loopback(host)
    assert ray_host_env(host) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # joinable, on every platform


def test_apply_ray_host_sets_the_switch_in_a_given_environment():
    environ = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "OTHER": "x"}
    apply_ray_host("127.0.0.1", environ)
    assert environ == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OTHER": "x"}  # chatray's setting decides
    apply_ray_host("192.168.1.5", environ)
    assert environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_the_local_cluster_starts_in_the_mode_of_its_host(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # the caller's value does not expose a loopback head
    assert ray_start_env(LocalCluster())["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert ray_start_env(LocalCluster(host="192.168.1.5"))["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_the_installed_ray_keeps_a_local_only_node_on_loopback():
    """The switch is Ray's (read in ray._private.services): fail here, not silently, if an upgrade drops it.

    Local-only, Ray's node address is 127.0.0.1 and an explicit 127.0.0.1 stays so (joinable, on Linux, Ray swaps it
    for the machine's IP); apply_ray_host() also reaches a Ray imported before it, as in chatray's commands.
    """
    code = ("import ray; from ray._private import services as s; from chatray.rayenv import apply_ray_host; "
            "apply_ray_host('127.0.0.1'); "
            "print(s.get_node_ip_address(), s.resolve_ip_for_localhost('127.0.0.1'), "
            "s.canonicalize_bootstrap_address('127.0.0.1:6379'))")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # Ray imported in joinable mode
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2] / "platform"),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out == ["127.0.0.1", "127.0.0.1", "127.0.0.1:6379"]


def test_connect_starts_a_local_ray_on_loopback_only(monkeypatch):
    """connect() without an address puts Ray in local-only mode before ray.init() (a stand-in records the call)."""
    calls = _fake_ray(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CHATRAY_RAY_HOST", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    assert connect()
    assert calls == [{"address": None, "log_to_driver": True, "switch": "0"}]


def test_connect_exposes_a_local_ray_only_when_asked_and_says_so(monkeypatch, capsys):
    calls = _fake_ray(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CHATRAY_RAY_HOST", "192.168.1.5")
    assert connect()
    assert calls == [{"address": None, "log_to_driver": True, "_node_ip_address": "192.168.1.5", "switch": "1"}]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: Ray listens on every network interface (address 192.168.1.5)")


@pytest.mark.parametrize(("address", "switch"), [("127.0.0.1:6379", "0"), ("localhost:6379", "0"), ("auto", "0"),
                                                 ("[::1]:6379", "0"), ("10.0.0.5:6379", "1")])
def test_connect_reaches_a_loopback_cluster_in_local_only_mode(monkeypatch, address, switch):
    """Else Ray would swap 127.0.0.1 for the machine's IP, where a loopback-only cluster does not listen."""
    calls = _fake_ray(monkeypatch)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")  # untouched for a cluster on another machine
    assert connect(address)
    assert calls == [{"address": address, "log_to_driver": True, "switch": switch}]


def _fake_ray(monkeypatch) -> list[dict]:
    """A stand-in ``ray`` module for connect(): records each ray.init() call with the switch Ray would read then."""
    calls: list[dict] = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = lambda **kw: calls.append({**kw, "switch": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delitem(sys.modules, "ray._private.ray_constants", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", ""))
    return calls
def test_workers_get_the_settings_and_none_of_the_secrets():
    assert forwarded_env(environ=DRIVER_ENV) == {
        "AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_PROFILE": "train", "AWS_EC2_METADATA_DISABLED": "true",
        # where a credential lives is no secret (the file is read on the worker's own node)
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
        "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/credentials", "HF_TOKEN_PATH": "/etc/hf/token",
        "HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",  # TOKENIZER is not TOKEN
        "CHATRAY_CACHE": "/cache/chatray", "CHATRAY_S3_ENDPOINT": "http://minio:9000",
    }


def test_the_default_is_this_processs_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    got = forwarded_env()
    assert got["HF_HOME"] == "/cache/hf" and "HF_TOKEN" not in got


@pytest.mark.parametrize("name", sorted(SECRET_NAMES) + ["hf_token", "aws_secret_access_key", "MY_PASSWD",
                                                         "SOME_CREDENTIALS", "X_APIKEY", "CHATRAY_OAUTH_CLIENT"])
def test_known_credentials_and_credential_words_are_secrets(name):
    assert is_secret(name)


@pytest.mark.parametrize("name", ["AWS_REGION", "HF_HOME", "TOKENIZERS_PARALLELISM", "CHATRAY_API_KEY_FILE",
                                  "AWS_WEB_IDENTITY_TOKEN_FILE", "HF_TOKEN_PATH", "CHATRAY_SECRETS_DIR"])
def test_settings_and_secret_locations_are_not(name):
    assert not is_secret(name)


def test_env_names_forward_a_secret_knowingly():
    got = forwarded_env(["HF_TOKEN", "GITHUB_TOKEN"], environ=DRIVER_ENV)
    assert (got["HF_TOKEN"], got["GITHUB_TOKEN"]) == ("hf_fake", "ghp_fake")
    assert "AWS_SECRET_ACCESS_KEY" not in got  # only the names given
    assert forward_warning("HF_TOKEN") == ("HF_TOKEN is forwarded in the job's runtime_env: visible to anyone who "
                                           "can read the Jobs API/dashboard")


@pytest.mark.parametrize(("name", "words"), [
    ("NOT_SET_ANYWHERE", "--env NOT_SET_ANYWHERE: NOT_SET_ANYWHERE is not set"),
    ("HF TOKEN", "not an environment variable name"),
    ("HF_TOKEN=x", "not an environment variable name"),
])
def test_env_names_must_be_set_variables(name, words):
    with pytest.raises(ChatrayError, match=words):
        forwarded_env([name], environ=DRIVER_ENV)
