"""What chatray puts into Ray's environment, in one place: the auth token, Serve's data plane, the variables
that travel to Ray workers, and the one way chatray connects to (or starts) Ray.

Used by ``data``, ``train``, ``serve`` and ``localcluster`` alike, so a cluster that ``chatray up`` starts and a
Ray that ``chatray serve`` starts in-process run with the same settings.

* **Token authentication**: Ray reads the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
  ``~/.ray/auth_token``; a client must also set ``RAY_AUTH_MODE=token`` (else "Missing authentication token").
  :func:`ray_auth_env` and :func:`ray_auth_headers` give a client both.
* **Serve's data plane**: :data:`SERVE_ENV` makes calls between Serve's processes (proxy -> Ingress replica ->
  Generator replica) go over direct gRPC instead of Ray actor calls, which makes each request's two hops
  cheaper (see benchmarks/README.md). Serve reads it once, when each of its processes starts, so it must be in
  the environment of whatever starts Ray. A value already set always wins: ``RAY_SERVE_USE_GRPC_BY_DEFAULT=0``
  gives back Ray's stock data plane. It is an internal Ray Serve setting (the one Ray's documented
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode turns on), so a unit test checks that the installed Ray still reads
  it. On the gRPC path messages are capped at 4 MiB, hence the 2 MiB cap on ``max_body_bytes``.
* **Forwarded variables**: :data:`FORWARD_PREFIXES` names the driver's settings that Ray workers need to see the
  same storage and hub settings as the driver.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

__all__ = [
    "FORWARD_PREFIXES",
    "SERVE_ENV",
    "apply_serve_env",
    "connect",
    "forwarded_env",
    "ray_auth_env",
    "ray_auth_headers",
    "serve_env",
    "token_file",
    "token_location",
]

SERVE_ENV: dict[str, str] = {
    # Direct gRPC between Serve's processes: the data plane of Ray's throughput-optimized mode without the rest
    # of that mode, which drops Serve's HTTP proxy (each ingress replica would then listen on a port of its
    # own, so http_options.port would no longer be one endpoint).
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}

# Storage endpoints and credentials, hub settings and chatray's own settings: workers must see what the
# driver sees, or a run on S3 or offline hub files behaves differently on a worker than on the driver.
FORWARD_PREFIXES = ("AWS_", "CHATRAY_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


# ---------------------------------------------------------------------------------------------------------------
# Token authentication


def token_file(env: Mapping[str, str] | None = None) -> Path:
    """Where Ray looks for the token file: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    env = os.environ if env is None else env
    return Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def token_location(env: Mapping[str, str] | None = None) -> str:
    """Where the token lives, for messages (the token itself is never printed)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    return str(token_file(env))


def ray_auth_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) plus ``RAY_AUTH_MODE=token`` when a Ray auth token is available."""
    out = dict(os.environ if env is None else env)
    if "RAY_AUTH_MODE" not in out and (out.get("RAY_AUTH_TOKEN") or token_file(out).is_file()):
        out["RAY_AUTH_MODE"] = "token"
    return out


def ray_auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` for Ray's HTTP APIs when a token is available, else ``{}``."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = token_file()
    if not token and path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------------------------
# Serve's data plane


def serve_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus each :data:`SERVE_ENV` setting that it does not set itself."""
    return {**SERVE_ENV, **env}


def apply_serve_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add the :data:`SERVE_ENV` settings that ``environ`` (default: this process's) does not set itself.

    Call it before ``ray.init()`` starts a local Ray; it changes nothing in a Ray that is already running.
    """
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)


# ---------------------------------------------------------------------------------------------------------------
# Workers' environment and connecting


def forwarded_env() -> dict[str, str]:
    """This process's variables that Ray workers should see too (names starting with :data:`FORWARD_PREFIXES`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


def connect(address: str | None = None, *, env_vars: Mapping[str, str] | None = None,
            include_dashboard: bool | None = None, log_to_driver: bool = True, quiet: bool = False) -> bool:
    """Connect to the Ray at ``address`` (default ``RAY_ADDRESS``), or start a local one, unless Ray is up here.

    A local Ray gets Serve's data plane (:data:`SERVE_ENV`) in its environment.

    Args:
        address: a Ray address; None reads ``RAY_ADDRESS`` and starts a local Ray when that is unset too.
        env_vars: the job's ``runtime_env`` variables (seen by every worker of this driver).
        include_dashboard: whether a local Ray starts its dashboard (Ray's default when None).
        log_to_driver: whether workers' output is printed here.
        quiet: only Ray's warnings and errors on this process's log.

    Returns:
        True when this call connected or started Ray, False when Ray was already initialized here.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if address is None:
        apply_serve_env()  # reaches Serve only because this ray.init() starts a new local Ray
        if include_dashboard is not None:
            kwargs["include_dashboard"] = include_dashboard
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": dict(env_vars)}
    if quiet:
        kwargs.update(configure_logging=True, logging_level="WARNING")
    ray.init(address=address, **kwargs)
    return True
