"""`chatray serve/chat/generate` fail early with one clear line (no Ray started for bad input)."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner

from chatray.cli import cli

CONFIG = str(Path(__file__).resolve().parents[3] / "serve_config.yaml")


def _run(*args: str, input: str | None = None):  # noqa: A002
    return CliRunner().invoke(cli, list(args), input=input)


def test_serve_rejects_a_missing_checkpoint_before_starting_ray(tmp_path):
    r = _run("serve", "--checkpoint", str(tmp_path / "nope") + ":best", "--config", CONFIG)
    assert r.exit_code == 1
    assert "checkpoint not found" in r.output and "nope" in r.output


def test_serve_names_a_bad_arg_and_a_bad_config(tmp_path):
    r = _run("serve", "--checkpoint", str(tmp_path), "--arg", "temperature=9")
    assert r.exit_code == 1 and "args.temperature" in r.output
    r = _run("serve", "--arg", "tempreature=0.5")
    assert r.exit_code == 1 and "args.tempreature: unknown arg" in r.output
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: [{name: x, import_path: chatray.serve.app:build_app, args: {max_tokens: 0}}]\n")
    r = _run("serve", "--config", str(bad))
    assert r.exit_code == 1 and "args.max_tokens" in r.output


def test_serve_reports_a_busy_port(tmp_path, monkeypatch):
    monkeypatch.setattr("chatray.storage.checkpoints.resolve_checkpoint", lambda uri: uri)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("serve", "--checkpoint", str(tmp_path), "--port", str(port))
    assert r.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in r.output and "--port" in r.output


def test_chat_and_generate_report_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    url = f"http://127.0.0.1:{port}"
    r = _run("generate", "--url", url, "hello")
    assert r.exit_code == 1 and "cannot reach a chatray server" in r.output and "chatray serve" in r.output
    r = _run("chat", "--url", url, input="hello\n")
    assert r.exit_code == 1 and "cannot reach" in r.output


def test_help_is_instant_and_documents_options():
    r = _run("serve", "--help")
    assert r.exit_code == 0 and "--checkpoint" in r.output and "--config" in r.output and "--port" in r.output
    r = _run("chat", "--help")
    assert "--temperature" in r.output and "--url" in r.output
