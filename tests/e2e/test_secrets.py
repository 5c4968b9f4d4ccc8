"""No secret in any job or app spec: a job submitted with `chatray train submit` and an app deployed with
`serve deploy` (API key on) on the e2e `ray start --head` cluster, while fake ``AWS_SECRET_ACCESS_KEY``,
``HF_TOKEN`` and ``CHATRAY_API_KEY`` values are set in the environment of `ray start` and of the clients
(tests/e2e/conftest.py).

Neither the Jobs API's job info (SDK and REST, plus the job's log) nor Serve's app config and status (REST,
`serve status`, `serve config`) contain any of those values, and the API key still works: the Ingress replica read
it from its node's environment. Positive controls show each place searched does show what a spec carries: a
variable forwarded on purpose with ``--env`` appears in the job info, the ``model_name`` arg in the app config.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "train"))

pytestmark = pytest.mark.e2e

MARK_ENV, MARK_VALUE = "E2E_FORWARDED_ON_PURPOSE", "visible-because-forwarded-by-name-6d1e"
MODEL_NAME = "secrets-e2e-model"


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _dump(obj: Any) -> str:
    """Everything an SDK object holds, as text (pydantic models, dataclasses, lists of them)."""
    if isinstance(obj, list):
        return "\n".join(_dump(o) for o in obj)
    for method in ("model_dump", "dict"):
        if callable(getattr(obj, method, None)):
            return json.dumps(getattr(obj, method)(), default=str)
    if dataclasses.is_dataclass(obj):
        return json.dumps(dataclasses.asdict(obj), default=str)
    return repr(obj)


def _leaks(texts: dict[str, str], secrets: dict[str, str]) -> list[str]:
    return [f"{name} in {where}" for where, text in texts.items() for name, value in secrets.items() if value in text]


def _submit_tiny_job(ray_head: dict, env: dict[str, str], work: Path) -> str:
    from train_helpers import make_dataset

    data = make_dataset(work / "data", n_train=120, n_eval=16, max_length=64)  # written without Ray
    r = _run([sys.executable, "-m", "chatray.cli", "train", "submit", "--config", "jobs/finetune_tiny.yaml",
              "--data", str(data), "--storage", str(work / "ckpts"), "--name", "secrets-e2e", "--max-steps", "4",
              "--address", ray_head["dashboard"], "--env", MARK_ENV, "--set", "model.n_layer=1",
              "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "train.micro_batch_size=8",
              "--set", "checkpoint.every=2", "--set", "eval.every=2", "--set", "eval.max_batches=1",
              "--set", "scaling.cpus_per_worker=0.5"], env)
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert warnings == [f"[chatray train] warning: {MARK_ENV} is forwarded in the job's runtime_env: visible to "
                        "anyone who can read the Jobs API/dashboard"], r.stderr
    return r.stdout.strip().splitlines()[-1]


def _wait_for_job(client: Any, job_id: str) -> None:
    deadline = time.time() + 300
    while (status := str(client.get_job_status(job_id))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job still {status}"
        time.sleep(2)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]


def _deploy(ray_head: dict, env: dict[str, str], work: Path, serve: str) -> str:
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = ray_head["free_port"]()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"].update(checkpoint=f"{work / 'ckpts' / 'secrets-e2e'}:best", model_name=MODEL_NAME)
    assert app["args"]["api_key_env"] == "CHATRAY_API_KEY" and "runtime_env" not in app
    for d in app["deployments"]:  # the 2-CPU cluster
        d["ray_actor_options"]["num_cpus"] = 0.25
    path = work / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _run([serve, "deploy", str(path), "-a", ray_head["dashboard"]], env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, subprocess.run([serve, "status", "-a", ray_head["dashboard"]], env=env,
                                                      capture_output=True, text=True).stdout
        time.sleep(2)


def test_no_secret_in_job_or_app_specs_and_the_api_key_works(ray_head, tmp_path):
    from chatray.rayenv import ray_auth_headers
    from chatray.train.submit import job_client

    secrets = ray_head["secrets"]
    assert set(secrets) == {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "CHATRAY_API_KEY"}
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_ADDRESS"}  # --address / -a given explicitly
    env[MARK_ENV] = MARK_VALUE
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    assert all(env[k] == v for k, v in secrets.items()), "the client's environment has the secrets too"
    dashboard, serve = ray_head["dashboard"], str(Path(sys.executable).parent / "serve")

    job_id = _submit_tiny_job(ray_head, env, tmp_path)
    client = job_client(dashboard)
    _wait_for_job(client, job_id)
    url = _deploy(ray_head, env, tmp_path, serve)
    try:
        # The key the replica read from its node's environment is required, and works.
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=wrong, timeout=60).status_code == 401
        auth = {"Authorization": f"Bearer {secrets['CHATRAY_API_KEY']}"}
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert ok.status_code == 200, ok.text

        headers = ray_auth_headers()
        job_texts = {
            "get_job_info": _dump(client.get_job_info(job_id)),
            "list_jobs": _dump(client.list_jobs()),
            "GET /api/jobs/": httpx.get(f"{dashboard}/api/jobs/", headers=headers, timeout=30).text,
            f"GET /api/jobs/{job_id}": httpx.get(f"{dashboard}/api/jobs/{job_id}", headers=headers, timeout=30).text,
            "job log": client.get_job_logs(job_id),
        }
        serve_texts = {
            "GET /api/serve/applications/": httpx.get(f"{dashboard}/api/serve/applications/", headers=headers,
                                                      timeout=30).text,
            "serve status": _run([serve, "status", "-a", dashboard], env).stdout,
            "serve config": _run([serve, "config", "-a", dashboard], env).stdout,
        }
    finally:
        subprocess.run([serve, "shutdown", "-y", "-a", dashboard], env=env, capture_output=True, timeout=120)

    # Positive controls: these are the places that show a spec (a variable forwarded by name, an app arg).
    for where in ("get_job_info", "list_jobs", "GET /api/jobs/", f"GET /api/jobs/{job_id}"):
        assert MARK_VALUE in job_texts[where], f"{where} does not show the job's runtime_env: {job_texts[where][:500]}"
    for where in ("GET /api/serve/applications/", "serve config"):
        assert MODEL_NAME in serve_texts[where], f"{where} does not show the app's args: {serve_texts[where][:500]}"
    assert "RUNNING" in serve_texts["serve status"], serve_texts["serve status"]
    assert _leaks({**job_texts, **serve_texts}, secrets) == []
