"""`chatray train submit|status|logs` against the e2e `ray start --head` cluster (127.0.0.1, token auth on).

Uses the session's ``ray_head`` cluster (tests/e2e/conftest.py). That cluster's workers carry a
fault-injection step (``ray_head["fault_step"]``); this run stops before it, so it checks the plain path:
submit returns a job id at once, the job succeeds, status and logs find it by run name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "train"))

pytestmark = pytest.mark.e2e


def _chatray(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_submit_status_logs_with_token_auth(ray_head, tmp_path):
    from train_helpers import make_dataset

    from chatray.train.submit import job_client

    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_ADDRESS"}  # --address given explicitly
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    address = ray_head["dashboard"]
    steps = min(10, ray_head["fault_step"] - 1)
    assert (Path.home() / ".ray" / "auth_token").is_file() or env.get("RAY_AUTH_TOKEN"), "token auth is on"
    data = make_dataset(tmp_path / "data", n_train=200, n_eval=16, max_length=64)  # no Ray needed to write it
    storage = tmp_path / "ckpts"
    t0 = time.perf_counter()
    res = _chatray(env, "train", "submit", "--config", "jobs/finetune_tiny.yaml", "--data", str(data),
                   "--storage", str(storage), "--name", "submit-e2e", "--max-steps", str(steps),
                   "--address", address, "--set", "model.n_layer=1", "--set", "model.n_embd=32",
                   "--set", "model.n_head=2", "--set", "train.micro_batch_size=8", "--set", "train.log_every=5",
                   "--set", "checkpoint.every=5", "--set", "eval.every=5", "--set", "scaling.cpus_per_worker=0.5")
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - t0 < 60, "submit returns at once"
    job_id = res.stdout.strip().splitlines()[-1]
    assert job_id.startswith("chatray-train-submit-e2e-")

    client = job_client(address)
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = str(client.get_job_status(job_id))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert f"step {steps}/{steps}" in logs
    summary = json.loads(next(ln for ln in logs.splitlines() if ln.startswith("summary: "))[len("summary: "):])
    assert summary["step"] == steps and summary["best"]
    assert (storage / "submit-e2e" / f"checkpoint_{steps:08d}" / "model.safetensors").is_file()

    st = _chatray(env, "train", "status", "submit-e2e", "--storage", str(storage), "--address", address)
    assert st.returncode == 0, st.stderr
    assert f"step        {steps}" in st.stdout and f"job         {job_id} SUCCEEDED" in st.stdout
    lg = _chatray(env, "train", "logs", "submit-e2e", "--address", address)
    assert lg.returncode == 0 and f"step {steps}/{steps}" in lg.stdout
    ls = _chatray(env, "train", "list", "--storage", str(storage), "--address", address)
    assert ls.returncode == 0 and "submit-e2e" in ls.stdout and job_id in ls.stdout


def test_submit_wait_shows_chatrays_lines_and_logs_the_rest(ray_head, tmp_path):
    """`--wait` streams the job: on the terminal only chatray's lines; the job's whole log in a file it names."""
    from train_helpers import make_dataset

    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_ADDRESS"}
    env["CHATRAY_LOG_DIR"] = str(tmp_path / "logs")
    env.pop("CHATRAY_VERBOSE", None)
    steps = min(4, ray_head["fault_step"] - 1)
    data = make_dataset(tmp_path / "data", n_train=100, n_eval=16, max_length=64)
    res = _chatray(env, "train", "submit", "--config", "jobs/finetune_tiny.yaml", "--data", str(data),
                   "--storage", str(tmp_path / "ckpts"), "--name", "quiet-e2e", "--max-steps", str(steps),
                   "--address", ray_head["dashboard"], "--wait", "--set", "model.n_layer=1", "--set",
                   "model.n_embd=32", "--set", "model.n_head=2", "--set", "train.micro_batch_size=8",
                   "--set", "train.log_every=2", "--set", "scaling.cpus_per_worker=0.5")
    assert res.returncode == 0, res.stderr
    out, err = res.stdout.splitlines(), res.stderr.splitlines()
    job_id = out[0]
    assert all(line.startswith("[chatray train] ") for line in out[1:]), out
    assert f"[chatray train] step {steps}/{steps}" in "\n".join(out)
    (log_file,) = (tmp_path / "logs").glob("train-submit-*.log")
    assert err == [f"[chatray] Ray's own output goes to {log_file} (--verbose shows it here)",
                   f"job {job_id}: SUCCEEDED"], err
    whole = log_file.read_text()
    assert "summary: " in whole and "(RayTrainWorker pid=" in whole  # Ray's lines are kept there
    assert "working_dir" in whole  # and the notices of the source upload
