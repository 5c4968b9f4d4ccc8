"""The demo's path on a real `ray start --head` cluster: prepare -> Jobs API training (surviving a killed
worker) -> checkpoint in storage -> `serve deploy serve_config.yaml` -> HTTP chat (plain and streaming)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_prepare_train_submit_serve_chat(ray_head, tmp_path_factory):
    env = ray_head["env"]
    fault_step = ray_head["fault_step"]
    free_port = ray_head["free_port"]
    work = tmp_path_factory.mktemp("e2e")
    data, storage = work / "data", work / "ckpt"
    chatray = [sys.executable, "-m", "chatray.cli"]

    # 1. prepare on the cluster (Ray Data connects through RAY_ADDRESS)
    _run([*chatray, "data", "prepare", "--demo", "--out", str(data), "--tokenizer", "train:1000",
          "--max-length", "64", "--quiet"], {**env, "RAY_ADDRESS": ray_head["address"]})
    assert (data / "manifest.json").is_file()

    # 2. training through the Ray Jobs API; a worker dies at fault_step and the run restarts from a checkpoint
    r = _run([*chatray, "train", "submit", "--address", ray_head["dashboard"], "--config", "jobs/finetune_tiny.yaml",
              "--data", str(data), "--storage", str(storage), "--name", "e2e", "--max-steps", "24",
              "--set", "checkpoint.every=8", "--set", "eval.every=8", "--set", "eval.max_batches=2",
              "--set", "train.micro_batch_size=8", "--set", "train.log_every=1",
              "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2"], env)
    from ray.job_submission import JobStatus

    from chatray.train.submit import job_client

    client = job_client(ray_head["dashboard"])  # token auth handled as `chatray train submit` does
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("chatray_run") == "e2e"]
    assert jobs, f"no job found for run e2e (submit printed {r.stdout!r})"
    job_id = jobs[0].submission_id
    deadline = time.time() + 480
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED}:
        assert time.time() < deadline, f"job still {status}:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    run = storage / "e2e"
    assert (run / f".fault-injected-{fault_step}").exists(), "the fault was not injected"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 25)), f"logged steps have a gap or repeat: {steps}"
    ckpts = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert ckpts and all((run / c / "model.safetensors").is_file() for c in ckpts)

    # 3. serve deploy serve_config.yaml (checkpoint and port set for this cluster)
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    for app in cfg["applications"]:
        app["args"]["checkpoint"] = f"{run}:best"
    deploy_cfg = work / "serve_config.yaml"
    deploy_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
    serve = str(Path(sys.executable).parent / "serve")
    _run([serve, "deploy", str(deploy_cfg), "-a", ray_head["dashboard"]], env)
    try:
        _chat_over_http(serve, ray_head, env, port)
    finally:  # free the cluster's CPUs for the other e2e tests
        subprocess.run([serve, "shutdown", "-y", "-a", ray_head["dashboard"]], env=env, capture_output=True,
                       timeout=120)


def _chat_over_http(serve: str, ray_head: dict, env: dict[str, str], port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, subprocess.run([serve, "status", "-a", ray_head["dashboard"]], env=env,
                                                      capture_output=True, text=True).stdout
        time.sleep(2)

    # 4. HTTP chat: plain and streaming, with the API key the replicas read from the cluster's environment
    auth = {"Authorization": f"Bearer {ray_head['secrets']['CHATRAY_API_KEY']}"}
    body = {"model": "chatray", "messages": [{"role": "user", "content": "你喜欢什么运动?"}], "temperature": 0.7,
            "max_tokens": 16, "seed": 1}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=120)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert 0 < out["usage"]["completion_tokens"] <= 16
    models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()
    assert "checkpoint_" in json.dumps(models)
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                      timeout=120) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]" and len(chunks) >= 2
    first = json.loads(chunks[0])
    assert first["object"] == "chat.completion.chunk"
    bad = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 5}, headers=auth, timeout=30)
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
