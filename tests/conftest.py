"""Shared fixtures: a local S3-compatible server (moto) and one local Ray instance per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support.ports import free_port

from chatray.rayenv import apply_serve_env

REPO = Path(__file__).resolve().parents[1]

# No test may reach the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The Serve data plane of the Ray that chatray starts (RAY_SERVE_USE_GRPC_BY_DEFAULT=0 in the environment runs the
# suite on Ray's stock one). Set here, before any test module imports ray.serve, so the tests' own handles use it too.
apply_serve_env()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; sets AWS_* env so pyarrow/boto3/Ray talk to it.

    Yields a dict with ``endpoint`` (http://127.0.0.1:PORT) and ``bucket`` (already created).
    """
    # This environment's moto first: an older moto elsewhere on PATH mis-handles pyarrow 26's multipart uploads.
    venv_exe = Path(sys.executable).parent / "moto_server"
    exe = str(venv_exe) if venv_exe.exists() else shutil.which("moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import pyarrow.fs as pafs

    bucket = "chatray-test"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir(bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket, "env": env}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Let ray.init() pick the auth mode of the cluster it starts (a Jobs client may have set token mode).
    os.environ.pop("RAY_AUTH_MODE", None)
    # address="local": always a fresh in-process cluster, never one started by `ray start` on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ray_session) -> str:
    """A prepared chatterbot-English dataset (trained 1000-token BPE, max_length 128); returns its folder."""
    from chatray.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("datasets") / "tiny"
    prepare_dataset(["chatterbot:english"], str(out), tokenizer="train:1000", max_length=128, eval_fraction=0.05,
                    shards=2, seed=0, progress=False)
    return str(out)
