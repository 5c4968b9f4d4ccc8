"""The API key is read inside the Ingress replica, and a replica that cannot read a key the builder saw refuses to
start (fail closed) instead of serving without auth.

The Ingress class runs here without Serve: settings are built by ``ServeArgs`` in this process (the builder), then
the environment is changed to what a replica on another node would see, and the replica's ``__init__`` runs.
"""

from __future__ import annotations

import logging

import pytest
from starlette.requests import Request

from chatray.errors import ChatrayError
from chatray.serve.apikey import read_api_key
from chatray.serve.app import ServeArgs
from chatray.serve.ingress import Ingress
from chatray.serve.schemas import APIError

# @serve.ingress wraps the class in an ASGI wrapper subclass; chatray's class (with __init__ and the helpers) is a
# base of it.
_IngressClass = next(c for c in Ingress.func_or_class.__mro__ if "_authorize" in vars(c))

KEY = "fake-api-key-9f8e7d"
ENV = "CHATRAY_API_KEY"


def _request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers})


def _status(ingress, authorization: str | None) -> int:
    try:
        ingress._authorize(_request(authorization))
    except APIError as e:
        return e.status
    return 200


@pytest.fixture
def log_lines():
    """What the ingress logs (Serve's logger may not propagate to the root logger, so listen on it directly)."""
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ray.serve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_the_replica_reads_the_key_from_its_own_environment(monkeypatch, log_lines):
    monkeypatch.delenv(ENV, raising=False)
    settings = ServeArgs(api_key_env=ENV).ingress_settings()  # the builder sees no key
    assert settings.require_api_key is False
    monkeypatch.setenv(ENV, KEY)  # ...but the replica's node has one: auth is on
    ingress = _IngressClass(None, settings)
    assert _status(ingress, None) == 401
    assert _status(ingress, "Bearer wrong") == 401
    assert _status(ingress, f"Bearer {KEY}") == 200
    assert any(f"${ENV}" in line for line in log_lines), log_lines  # says where the key came from...
    assert not any(KEY in line for line in log_lines)  # ...never the key


def test_a_replica_without_the_key_the_builder_saw_refuses_to_start(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    settings = ServeArgs(api_key_env=ENV).ingress_settings()  # built where the key is set (e.g. `chatray serve`)
    monkeypatch.delenv(ENV)  # a replica on a node whose `ray start` did not have it
    with pytest.raises(ChatrayError) as info:
        _IngressClass(None, settings)
    e = info.value
    assert f"{ENV} is set where the app was built but not in this Ingress replica's environment" in str(e)
    assert "refusing to serve without an API key" in str(e)
    assert "ray start" in e.hint and "Secret" in e.hint and "api_key_file" in e.hint
    assert KEY not in f"{e} {e.hint}"


def test_no_key_anywhere_means_no_auth(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ingress = _IngressClass(None, ServeArgs(api_key_env=ENV).ingress_settings())
    assert _status(ingress, None) == 200


def test_the_key_file_wins_over_the_variable(tmp_path, monkeypatch):
    key_file = tmp_path / "api_key"
    key_file.write_text(f"  {KEY}\n")  # as `echo` or a mounted Secret writes it: surrounding whitespace dropped
    monkeypatch.setenv(ENV, "the-variables-key")
    ingress = _IngressClass(None, ServeArgs(api_key_env=ENV, api_key_file=str(key_file)).ingress_settings())
    assert _status(ingress, f"Bearer {KEY}") == 200
    assert _status(ingress, "Bearer the-variables-key") == 401


@pytest.mark.parametrize(("content", "words"), [
    (None, "does not exist on this Ingress replica's node"),
    ("\n", "is empty: refusing to serve without an API key"),
])
def test_a_missing_or_empty_key_file_stops_the_replica(tmp_path, monkeypatch, content, words):
    monkeypatch.setenv(ENV, KEY)  # a key in the environment does not stand in for the file's
    key_file = tmp_path / "api_key"
    if content is not None:
        key_file.write_text(content)
    settings = ServeArgs(api_key_env=ENV, api_key_file=str(key_file)).ingress_settings()
    with pytest.raises(ChatrayError, match=words) as info:
        _IngressClass(None, settings)
    assert str(key_file) in str(info.value) and KEY not in str(info.value)


def test_blank_values_are_no_key(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    settings = ServeArgs(api_key_env=ENV).ingress_settings()
    assert read_api_key(settings, {ENV: "  "}) is None
    assert read_api_key(settings, {ENV: f" {KEY}\n"}) == KEY
