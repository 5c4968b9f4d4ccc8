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
* **Loopback by default**: a Ray that chatray starts on this machine listens on 127.0.0.1 only
  (:func:`ray_host_env`, :func:`apply_ray_host`), unless ``CHATRAY_RAY_HOST`` names another address: then Ray
  advertises the machine's IP and its servers listen on every interface (:func:`exposure_warning` says so).
  docs/operations.md lists what listens where, including the one listener Ray 2.60 keeps on all interfaces.
* **Forwarded variables**: :data:`FORWARD_PREFIXES` names the driver's settings that Ray workers need to see the
  same storage and hub settings as the driver. Secrets (:func:`is_secret`) are never among them: a job's
  ``runtime_env`` is stored in the GCS and shown by the Jobs API and the dashboard to anyone who can reach them.
  Credentials reach Ray's processes from where Ray expects them (the environment of ``ray start`` on each node, a
  Kubernetes Secret, the node's IAM role); ``--env NAME`` forwards one by name, knowingly (:func:`forwarded_env`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from chatray.errors import ChatrayError

__all__ = [
    "FORWARD_PREFIXES",
    "RAY_HOST_ENV",
    "SECRET_NAMES",
    "SERVE_ENV",
    "WILDCARD_HOSTS",
    "apply_ray_host",
    "apply_serve_env",
    "connect",
    "exposure_warning",
    "forward_warning",
    "forwarded_env",
    "is_loopback",
    "is_secret",
    "ray_auth_env",
    "ray_auth_headers",
    "ray_host_env",
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

# Storage endpoints and regions, hub settings and chatray's own settings: workers must see what the driver sees,
# or a run on S3 or offline hub files behaves differently on a worker than on the driver. Secrets among them are
# left out (is_secret).
FORWARD_PREFIXES = ("AWS_", "CHATRAY_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")

# Credentials chatray's users are known to set, withheld whatever the name rule below says.
SECRET_NAMES = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CHATRAY_API_KEY",
})
# A name that says it holds a credential. TOKENIZERS_* (the tokenizers library's settings) merely starts with
# "TOKEN". A name ending in _FILE/_PATH/_DIR holds where a secret lives, which is no secret
# (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_SHARED_CREDENTIALS_FILE, HF_TOKEN_PATH).
_SECRET_WORDS = re.compile(r"KEY|SECRET|TOKEN(?!IZER)|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
_LOCATION_SUFFIXES = ("_FILE", "_PATH", "_DIR")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
# Where a local Ray listens

RAY_HOST_ENV = "CHATRAY_RAY_HOST"  # the address a Ray that chatray starts advertises; default 127.0.0.1

# Ray's switch between a local-only Ray and one that other machines may join (its default is local-only on macOS
# and Windows, joinable on Linux). Local-only, Ray gives its node 127.0.0.1 and every server it starts listens
# there: GCS, raylet, object manager and workers (Ray binds them to 127.0.0.1 exactly when the node's address is
# 127.0.0.1, else to all interfaces), dashboard, agents, metrics and Ray Client. Joinable, Ray replaces even an
# explicit 127.0.0.1 (`ray start --node-ip-address`, `ray.init(_node_ip_address=...)`, a RAY_ADDRESS of
# 127.0.0.1:port) by the machine's IP, so a client of a local-only Ray needs the switch too.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")  # every interface


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback: ``localhost``, 127.0.0.0/8 or ``::1`` (brackets allowed)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _address_host(address: str) -> str | None:
    """The host of a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``); None for ``auto``/``local``."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest in ("auto", "local", ""):
        return None
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def ray_host_env(host: str) -> dict[str, str]:
    """What makes a Ray started (or reached) with this environment use ``host``: Ray's local-only mode for a
    loopback host, its joinable mode (every interface, also on macOS) for any other."""
    return {_CLUSTER_SWITCH: "0" if is_loopback(host) else "1"}


def apply_ray_host(host: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Put :func:`ray_host_env` of ``host`` into ``environ`` (default: this process's).

    The processes of a Ray started afterwards inherit it. Ray reads the variable when it is imported, so a Ray
    already imported in this process is told directly.
    """
    environ.update(ray_host_env(host))
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and environ is os.environ:
        # Read by ray._private.services at each call (a unit test checks that the installed Ray still does).
        constants.ENABLE_RAY_CLUSTER = not is_loopback(host)


def exposure_warning(host: str, what: str = "Ray") -> str:
    """The one line to print when ``what`` is started on a non-loopback ``host``."""
    return (f"warning: {what} listens on every network interface (address {host}), not on 127.0.0.1 only: "
            "anyone who can reach this machine can reach it, and token authentication is what protects it")


# ---------------------------------------------------------------------------------------------------------------
# Workers' environment and connecting


def is_secret(name: str) -> bool:
    """Whether variable ``name`` holds a credential, so that chatray never puts it into a job's or app's spec.

    A secret is a name in :data:`SECRET_NAMES`, or one that contains KEY, SECRET, TOKEN (not TOKENIZER),
    PASSWORD, PASSWD, CREDENTIAL or AUTH (any case) and does not end in ``_FILE``, ``_PATH`` or ``_DIR``.
    """
    if name.upper() in SECRET_NAMES:
        return True
    return bool(_SECRET_WORDS.search(name)) and not name.upper().endswith(_LOCATION_SUFFIXES)


def forward_warning(name: str) -> str:
    """The warning shown once for each variable forwarded by name (``--env NAME``)."""
    return f"{name} is forwarded in the job's runtime_env: visible to anyone who can read the Jobs API/dashboard"


def forwarded_env(explicit: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables Ray workers should see as this process does: the non-secret ones starting with
    :data:`FORWARD_PREFIXES`, plus each variable named in ``explicit`` (``--env NAME``), secret or not.

    Args:
        explicit: variable names to forward whatever they hold; the caller warns with :func:`forward_warning`.
        environ: where to read them (default: this process's environment).

    Returns:
        Name -> value, ready for a ``runtime_env``'s ``env_vars``.

    Raises:
        ChatrayError: a name in ``explicit`` that is not a variable name or is not set here.
    """
    environ = os.environ if environ is None else environ
    out = {k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES) and not is_secret(k)}
    for name in explicit:
        if not _ENV_NAME.fullmatch(name):
            raise ChatrayError(f"--env {name!r}: not an environment variable name",
                               hint="pass the variable's name, e.g. --env HF_TOKEN (its value is read here)")
        if name not in environ:
            raise ChatrayError(f"--env {name}: {name} is not set in this environment",
                               hint=f"export {name} first, or leave it to the nodes' environment")
        out[name] = environ[name]
    return out


def connect(address: str | None = None, *, env_vars: Mapping[str, str] | None = None,
            include_dashboard: bool | None = None, log_to_driver: bool = True, quiet: bool = False) -> bool:
    """Connect to the Ray at ``address`` (default ``RAY_ADDRESS``), or start a local one, unless Ray is up here.

    A local Ray gets Serve's data plane (:data:`SERVE_ENV`) in its environment and listens on 127.0.0.1 only
    (:func:`apply_ray_host`) unless ``CHATRAY_RAY_HOST`` names another address, which is then warned about. A
    Ray on a loopback address (or ``auto``) is reached in local-only mode, so that Ray does not swap 127.0.0.1 for
    the machine's IP, where a local-only cluster does not listen.

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
    if address is None or address == "local":
        apply_serve_env()  # reaches Serve only because this ray.init() starts a new local Ray
        if include_dashboard is not None:
            kwargs["include_dashboard"] = include_dashboard
        host = os.environ.get(RAY_HOST_ENV, "").strip() or "127.0.0.1"
        apply_ray_host(host)
        if not is_loopback(host):
            print(exposure_warning(host), file=sys.stderr, flush=True)
            if host not in WILDCARD_HOSTS:
                kwargs["_node_ip_address"] = host
    elif (host := _address_host(address)) is None or is_loopback(host):
        apply_ray_host("127.0.0.1")
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": dict(env_vars)}
    if quiet:
        kwargs.update(configure_logging=True, logging_level="WARNING")
    from chatray.raylogs import active_output

    output = active_output()
    if output is not None:
        output.start()  # before ray.init(): its start-up notices go to the log file too
    ray.init(address=address, **kwargs)
    if output is not None:
        output.attach_workers()
    return True
