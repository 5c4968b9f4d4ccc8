"""`train submit` pieces that need no cluster: what the job uploads, token auth headers, the entrypoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatray.errors import ChatrayError
from chatray.train import submit

REPO = Path(__file__).resolve().parents[3]


def test_runtime_env_ships_the_whole_package_but_no_data():
    from ray._private.runtime_env.packaging import _get_excludes  # the matcher Ray applies to uploads

    env = submit.runtime_env(REPO)
    pkg = Path(env["py_modules"][0])
    excluded = _get_excludes(pkg, env["excludes"])
    code = [p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts]
    assert any(p.parent.name == "data" for p in code)
    assert not [p for p in code if excluded(p)], "package code must never be excluded (chatray/data!)"
    wd_excluded = _get_excludes(REPO, env["excludes"])
    assert not wd_excluded(REPO / "jobs" / "finetune.py") and not wd_excluded(REPO / "jobs" / "finetune_tiny.yaml")
    for junk in (".git/config", ".venv/bin/python", ".demo/data/train/part-00000.parquet",
                 "x/checkpoint_00000010/model.safetensors", "x/train_state.pt"):
        assert wd_excluded(REPO / junk), junk


def test_auth_header_from_token_file(tmp_path, monkeypatch):
    token = tmp_path / "tok"
    token.write_text("secret-token\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert submit._auth_headers() == {"Authorization": "Bearer secret-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit._auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit._auth_headers() == {}


def _fake_jobs_api(monkeypatch) -> dict:
    """Replace the Jobs API client; returns the dict that receives what ``submit_job`` was given."""
    seen: dict = {}

    class FakeClient:
        def submit_job(self, **kw):
            seen.update(kw)
            return kw["submission_id"]

    monkeypatch.setattr(submit, "job_client", lambda address=None: FakeClient())
    return seen


def test_submit_builds_entrypoint_with_absolute_paths(tmp_path, monkeypatch):
    seen = _fake_jobs_api(monkeypatch)
    monkeypatch.chdir(tmp_path)
    job = submit.submit_training(str(REPO / "jobs" / "finetune_tiny.yaml"), ["train.max_steps=5"],
                                 address="http://127.0.0.1:1")
    assert job.startswith("chatray-train-tiny-demo-")
    ep = seen["entrypoint"]
    assert ep.startswith("python jobs/finetune.py --config jobs/finetune_tiny.yaml --set train.max_steps=5")
    assert f"data.path={tmp_path / '.demo' / 'data'}" in ep  # relative paths resolved where the user ran it
    assert seen["metadata"] == {"chatray_run": "tiny-demo", "chatray_storage": str(tmp_path / ".demo/checkpoints")}


def test_unreachable_cluster_is_one_clear_error():
    with pytest.raises(ChatrayError, match=r"cannot reach the Ray Jobs API at http://127\.0\.0\.1:9"):
        submit.job_client("http://127.0.0.1:9")


FAKE_SECRETS = {"AWS_SECRET_ACCESS_KEY": "fake-aws-secret-123", "AWS_SESSION_TOKEN": "fake-session-456",
                "HF_TOKEN": "hf_fake789", "CHATRAY_API_KEY": "fake-api-key-000"}


def _submitted_env(monkeypatch, forward_env: tuple[str, ...] = ()) -> dict[str, str]:
    seen = _fake_jobs_api(monkeypatch)
    submit.submit_training(str(REPO / "jobs" / "finetune_tiny.yaml"), [], address="http://127.0.0.1:1",
                           forward_env=forward_env)
    return seen["runtime_env"]["env_vars"]


def test_the_job_spec_carries_settings_but_no_secrets(monkeypatch, capsys):
    for k, v in {**FAKE_SECRETS, "AWS_REGION": "eu-west-1", "HF_HOME": "/cache/hf"}.items():
        monkeypatch.setenv(k, v)
    env = _submitted_env(monkeypatch)
    assert (env["AWS_REGION"], env["HF_HOME"]) == ("eu-west-1", "/cache/hf")
    assert not set(FAKE_SECRETS) & set(env) and not set(FAKE_SECRETS.values()) & set(env.values())
    assert "warning" not in capsys.readouterr().err


def test_env_forwards_a_named_secret_with_one_warning_line(monkeypatch, capsys):
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    env = _submitted_env(monkeypatch, ("HF_TOKEN",))
    assert env["HF_TOKEN"] == "hf_fake789" and "AWS_SECRET_ACCESS_KEY" not in env
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == ["[chatray train] warning: HF_TOKEN is forwarded in the job's runtime_env: visible to anyone "
                        "who can read the Jobs API/dashboard"]


def test_env_with_an_unset_name_is_one_clear_error_before_the_cluster_is_asked():
    env = {k: v for k, v in os.environ.items() if k != "CHATRAY_NOT_SET"}
    r = subprocess.run([sys.executable, "-m", "chatray.cli", "train", "submit", "--config", "jobs/finetune_tiny.yaml",
                        "--env", "CHATRAY_NOT_SET", "--address", "http://127.0.0.1:9"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "error: --env CHATRAY_NOT_SET: CHATRAY_NOT_SET is not set in this environment" in r.stderr
    assert "Traceback" not in r.stderr and "cannot reach" not in r.stderr
