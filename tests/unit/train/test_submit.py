"""`train submit` pieces that need no cluster: what the job uploads, token auth headers, the entrypoint."""

from __future__ import annotations

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


def test_submit_builds_entrypoint_with_absolute_paths(tmp_path, monkeypatch):
    seen = {}

    class FakeClient:
        def submit_job(self, **kw):
            seen.update(kw)
            return kw["submission_id"]

    monkeypatch.setattr(submit, "job_client", lambda address=None: FakeClient())
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
