"""``chatray train submit``: run ``jobs/finetune.py`` on a Ray cluster through the Ray Jobs API.

The job's runtime environment uploads the source tree (``working_dir``, without ``.git``, venvs, datasets
and checkpoints) and ships the ``chatray`` package as a ``py_module`` so every worker can import it. Local
relative paths in the config are made absolute first: on a one-node cluster or a shared NFS mount they
name the same files for the job. Ray 2.60 clusters started with ``ray start --head`` require a token; it
is read from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and sent as a bearer token.

The job's ``env_vars`` carry this machine's non-secret settings only (:func:`chatray.rayenv.forwarded_env`): the
Jobs API and the dashboard show a job's runtime environment to anyone who can reach them, so credentials come
from the cluster's nodes (``ray start``'s environment, a Kubernetes Secret, an IAM role) unless ``--env NAME``
forwards one by name.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.errors import ChatrayError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = ["DEFAULT_ADDRESS", "RUNTIME_ENV_EXCLUDES", "job_client", "job_logs", "latest_job", "runtime_env",
           "source_root", "submit_training"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Applied to the working_dir and to the chatray py_module alike, so only patterns that cannot match package
# code (no bare "data": that would drop chatray/data). Datasets and checkpoints go by their file types.
RUNTIME_ENV_EXCLUDES = [
    ".git", ".venv", "venv", ".demo", ".device", ".whl", ".pytest_cache", ".ruff_cache", "**/__pycache__",
    "*.egg-info", "*.parquet", "*.safetensors", "*.pt", "*.bin", "*.arrow", "/tests",
]


def source_root() -> Path:
    """The chatray source tree (the folder holding ``jobs/finetune.py`` and ``platform/chatray``).

    Raises:
        ChatrayError: when chatray is installed without its source tree.
    """
    import chatray

    root = Path(chatray.__file__).resolve().parents[2]
    if not (root / "jobs" / "finetune.py").is_file():
        raise ChatrayError(f"`train submit` needs the chatray source tree (no jobs/finetune.py under {root})",
                           hint="run it from a git checkout of chatray (pip install -e .)")
    return root


def _auth_headers() -> dict[str, str]:
    from chatray.rayenv import ray_auth_headers

    headers = ray_auth_headers()
    if headers:
        # The Jobs SDK adds its own header only in token mode; ours is used either way.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return headers


def job_client(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for ``address`` (default ``RAY_ADDRESS`` or the local dashboard), token auth included.

    Raises:
        ChatrayError: when the dashboard cannot be reached or refuses the token.
    """
    from ray.job_submission import JobSubmissionClient

    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr.startswith("ray://") or "://" not in addr:
        host = addr.removeprefix("ray://").split(":")[0] or "127.0.0.1"
        addr = f"http://{host}:8265"
    try:
        return JobSubmissionClient(addr, headers=_auth_headers())
    except Exception as e:  # ConnectionError, RuntimeError from the SDK's version check, auth errors
        raise ChatrayError(f"cannot reach the Ray Jobs API at {addr}: {str(e).strip().splitlines()[0]}",
                           hint="start a cluster (`ray start --head`) or pass --address http://HEAD:8265; "
                           "with token auth set RAY_AUTH_TOKEN or ~/.ray/auth_token") from e


def runtime_env(root: Path, forward_env: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime environment: source tree + ``chatray`` package + forwarded settings.

    Args:
        root: the source tree (:func:`source_root`).
        forward_env: variable names forwarded whatever they hold (``--env``), next to the non-secret settings.

    Raises:
        ChatrayError: a name in ``forward_env`` that is not set here.
    """
    from chatray.rayenv import forwarded_env

    env = forwarded_env(forward_env)
    return {"working_dir": str(root), "py_modules": [str(root / "platform" / "chatray")],
            "excludes": RUNTIME_ENV_EXCLUDES, "env_vars": env}


def _config_arg(config: str | None, root: Path) -> list[str]:
    if not config:
        return []
    p = Path(config).expanduser().resolve()
    if not p.is_file():
        raise ChatrayError(f"config file not found: {config}")
    try:
        return ["--config", str(p.relative_to(root))]  # uploaded with the working_dir
    except ValueError:
        return ["--config", str(p)]  # must be readable on the head node (one node, or shared storage)


def submit_training(config: str | None, overrides: list[str], *, address: str | None = None,
                    submission_id: str | None = None, forward_env: Sequence[str] = ()) -> str:
    """Validate a run locally, then submit ``jobs/finetune.py`` for it; returns at once with the job id.

    Args:
        config: YAML file (inside the source tree, or a path the cluster can read).
        overrides: ``KEY=VALUE`` strings, as for ``--set``.
        address: the Ray dashboard (default ``RAY_ADDRESS`` or http://127.0.0.1:8265).
        submission_id: job id to use (default ``chatray-train-<run>-<time>-<random>``).
        forward_env: variable names to put into the job's ``env_vars`` (``--env``), each with a warning line.

    Raises:
        ChatrayError / ConfigError: bad config, an unset ``forward_env`` name, unreachable cluster.
    """
    from chatray.config import FinetuneConfig, load_config
    from chatray.rayenv import forward_warning
    from chatray.train.console import warn
    from chatray.train.plan import absolute_paths

    cfg = absolute_paths(load_config(FinetuneConfig, config, overrides))
    root = source_root()
    env = runtime_env(root, forward_env)  # an unset name fails here, before the cluster is contacted
    for name in forward_env:
        warn(forward_warning(name))
    sets = list(overrides) + [f"data.path={cfg.data.path}", f"run.storage_path={cfg.run.storage_path}"]
    args = ["python", "jobs/finetune.py", *_config_arg(config, root)]
    for s in sets:
        args += ["--set", s]
    entrypoint = " ".join(shlex.quote(a) for a in args)
    client = job_client(address)
    sid = submission_id or f"chatray-train-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=sid,
                                 metadata={"chatray_run": cfg.run.name, "chatray_storage": cfg.run.storage_path})
    except Exception as e:
        raise ChatrayError(f"job submission to the Ray cluster failed: {str(e).strip().splitlines()[0]}") from e


def latest_job(client: JobSubmissionClient, run: str) -> Any | None:
    """The most recent job submitted for run name ``run`` (by its ``chatray_run`` metadata), or None."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("chatray_run") == run]
    return max(jobs, key=lambda j: j.start_time or 0, default=None)


def job_logs(client: JobSubmissionClient, job_id: str, *, follow: bool = False) -> Any:
    """The job's driver log: the whole text, or (``follow``) an iterator of chunks until the job ends."""
    if not follow:
        return client.get_job_logs(job_id)

    def _iter() -> Any:
        import asyncio

        loop = asyncio.new_event_loop()
        chunks = client.tail_job_logs(job_id)  # async generator, ends when the job does
        try:
            while True:
                try:
                    yield loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    return _iter()
