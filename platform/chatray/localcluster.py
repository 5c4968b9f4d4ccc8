"""A single-node Ray cluster on 127.0.0.1 for laptops and CI: start, add a worker node, stop.

One implementation behind ``chatray up`` / ``chatray down``, ``make demo``, the e2e tests and the
``cluster/local/*.sh`` scripts (which run ``python -m chatray.localcluster start|stop|add-worker``).

* **Its own Ray temp dir** (``$CHATRAY_HOME/ray``, i.e. ``~/.chatray/ray``, unless set): sessions, logs, sockets
  and ``chatray-cluster.env``, the file clients ``source`` (``RAY_AUTH_MODE=token`` and the addresses).
* **Marked processes**: ``ray start`` runs with ``CHATRAY_LOCAL_CLUSTER=<temp dir>`` in its environment, which
  every process of the cluster inherits. Stopping sends SIGTERM, then SIGKILL after a grace period, to those
  processes only (and to Ray's processes that name the temp dir, and their children) -- never plain
  ``ray stop``, which would stop every Ray of this user on the machine (a notebook's ``ray.init()``, a test
  suite's Ray, another project's cluster).
* **Token authentication, always on**: a token is created when there is none (``ray get-auth-token
  --generate`` writes ``~/.ray/auth_token``), Ray runs with ``RAY_AUTH_MODE=token``, and
  ``RAY_AUTH_MODE=disabled`` is refused. :func:`ray_auth_env` / :func:`ray_auth_headers` give clients the same.
* **A state file** (``$CHATRAY_HOME/local-cluster.json``) records each cluster started, by temp dir, so
  ``chatray down`` stops only a cluster chatray started (``--force`` also without that record).

Settings come from ``CHATRAY_*`` environment variables (:meth:`LocalCluster.from_env`; ``cluster/local/_env.sh``
lists them) or from a :class:`LocalCluster` passed in.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from chatray.errors import ChatrayError
from chatray.rayenv import ray_auth_env, ray_auth_headers, serve_env, token_file, token_location

__all__ = [
    "MARKER_ENV",
    "LocalCluster",
    "add_local_worker",
    "cluster_alive",
    "cluster_processes",
    "default_temp_dir",
    "describe_cluster",
    "main",
    "ray_executable",
    "start_local_cluster",
    "stop_cluster_processes",
    "stop_local_cluster",
]

MARKER_ENV = "CHATRAY_LOCAL_CLUSTER"  # = the cluster's Ray temp dir, in the environment of all its processes
_DEFAULT_AGENT_PORT = 52365
_DEFAULT_CLIENT_PORT = 10001
# Ray flags through which its processes name their temp/session/log dirs (`--temp_dir=...`, `--session-dir=...`).
_DIR_FLAGS = frozenset({"--temp-dir", "--session-dir", "--log-dir", "--logs-dir"})
# Ray's Unix sockets live at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, and a socket path
# has at most 107 bytes on Linux (103 on macOS): longer temp dirs make Ray fail at start with obscure errors.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107

Echo = Callable[[str], None]


def _chatray_home() -> Path:
    return Path(os.environ.get("CHATRAY_HOME") or Path.home() / ".chatray").expanduser()


def _state_file() -> Path:
    """Records the clusters chatray started, by temp dir (so `chatray down` stops only what it started)."""
    return _chatray_home() / "local-cluster.json"


def default_temp_dir() -> Path:
    """The local cluster's Ray temp dir unless one is given: ``$CHATRAY_HOME/ray`` (``~/.chatray/ray``)."""
    return _chatray_home() / "ray"


@dataclass
class LocalCluster:
    """Addresses and Ray temp dir of a local cluster."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    host: str = "127.0.0.1"  # the head binds and advertises this address
    agent_port: int | None = None  # the head's job agent (52365, else a free port, when None)
    dashboard_host: str = "127.0.0.1"  # dashboard + Jobs API + Serve REST API bind address
    client_port: int | None = None  # Ray Client server, ray:// (10001, else a free port, when None)
    temp_dir: str | None = None  # Ray's temp dir (default_temp_dir() when None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LocalCluster:
        """Settings from ``CHATRAY_RAY_HOST``, ``CHATRAY_RAY_PORT``, ``CHATRAY_DASHBOARD_HOST``,
        ``CHATRAY_DASHBOARD_PORT``, ``CHATRAY_DASHBOARD_AGENT_PORT``, ``CHATRAY_RAY_CLIENT_PORT`` and
        ``CHATRAY_RAY_TEMP_DIR``; unset or empty ones take the defaults.

        Raises:
            ValueError: naming every variable that is not a port number.
        """
        env = os.environ if env is None else env
        problems: list[str] = []

        def port(name: str) -> int | None:
            value = env.get(name, "").strip()
            if not value:
                return None
            if not value.isdigit() or not 0 < int(value) < 65536:
                problems.append(f"{name} must be a TCP port number (1-65535), got {value!r}")
                return None
            return int(value)

        out = cls(host=env.get("CHATRAY_RAY_HOST") or cls.host,
                  dashboard_host=env.get("CHATRAY_DASHBOARD_HOST") or cls.dashboard_host,
                  temp_dir=env.get("CHATRAY_RAY_TEMP_DIR") or None)
        out.gcs_port = port("CHATRAY_RAY_PORT") or cls.gcs_port
        out.dashboard_port = port("CHATRAY_DASHBOARD_PORT") or cls.dashboard_port
        out.agent_port = port("CHATRAY_DASHBOARD_AGENT_PORT")
        out.client_port = port("CHATRAY_RAY_CLIENT_PORT")
        if problems:
            raise ValueError("; ".join(problems))
        return out

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_client_host(self) -> str:
        """Where clients reach the dashboard: a wildcard bind is still reached through the advertised host."""
        return self.host if self.dashboard_host in ("0.0.0.0", "::", "[::]") else self.dashboard_host

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard_client_host}:{self.dashboard_port}"

    @property
    def ray_temp_dir(self) -> Path:
        """The temp dir as an absolute path (its string is how the state file and the marker name it)."""
        return Path(os.path.abspath(Path(self.temp_dir or default_temp_dir()).expanduser()))

    @property
    def env_file(self) -> Path:
        """``source`` it to point Ray's CLIs and SDKs at this cluster (written at start)."""
        return self.ray_temp_dir / "chatray-cluster.env"


# ---------------------------------------------------------------------------------------------------------------
# Ray CLI and token authentication


def ray_executable() -> str:
    """The ``ray`` CLI next to this Python (the venv's), else the one on PATH."""
    return _cli("ray")


def _cli(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ChatrayError(f"the `{name}` command was not found", hint="pip install 'ray[default,serve]'")
    return found


def _ensure_token(env: Mapping[str, str], echo: Echo) -> None:
    """Make sure a token exists: `ray start --head` then turns token auth on, and clients here read the same."""
    if env.get("RAY_AUTH_TOKEN"):
        return
    path = token_file(env)
    if env.get("RAY_AUTH_TOKEN_PATH"):
        if not path.is_file() or path.stat().st_size == 0:
            raise ChatrayError(f"RAY_AUTH_TOKEN_PATH={path} does not exist or is empty",
                               hint="unset it to use ~/.ray/auth_token (created for you), or write a token there")
        return
    if path.is_file() and path.stat().st_size > 0:
        return
    echo(f"creating a Ray authentication token in {path} (ray get-auth-token --generate)")
    r = subprocess.run([ray_executable(), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,  # prints it
                       stderr=subprocess.PIPE, text=True, env={k: v for k, v in env.items() if k != MARKER_ENV},
                       timeout=120)
    if r.returncode != 0 or not path.is_file():
        raise ChatrayError(f"`ray get-auth-token --generate` failed: {r.stderr.strip()[-300:]}")
    path.chmod(0o600)


def _ray_env(cluster: LocalCluster, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``ray start``: token auth on, Serve's data plane settings, this Python first on PATH,
    the cluster's marker."""
    env = {**os.environ, **(extra_env or {})}
    mode = env.get("RAY_AUTH_MODE") or "token"
    if mode.lower() != "token":
        raise ChatrayError(f"RAY_AUTH_MODE={mode}: chatray's local cluster always uses token authentication",
                           hint="unset RAY_AUTH_MODE (or set it to token)")
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = serve_env(env)  # Serve's gRPC data plane, unless the caller's environment says otherwise
    # Job drivers run `python ...` from the raylet's PATH: make that this environment's Python (the venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    # Inherited by every process of the cluster: stop_cluster_processes() finds them by it.
    env[MARKER_ENV] = str(cluster.ray_temp_dir)
    return env


# ---------------------------------------------------------------------------------------------------------------
# Ports and health


def _port_free(port: int) -> bool:
    """Whether nothing is bound to ``port`` on 127.0.0.1 nor on all interfaces."""
    for host in ("127.0.0.1", "0.0.0.0"):  # Ray's agent binds the node IP or all interfaces: check both
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_or_free(wanted: int) -> int:
    # Ray's job agent always wants 52365; another Ray on this machine (a test suite's ray.init()) may hold it,
    # and jobs then fail with "No available agent to submit job". Take a free port instead.
    return wanted if _port_free(wanted) else _free_port()


def _port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or None) of a GET with this machine's Ray token; (0, None) when unreachable."""
    req = urllib.request.Request(url, headers=ray_auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def _dashboard_state(cluster: LocalCluster, timeout: float = 2.0) -> Literal["ok", "refused", "down"]:
    """Whether the dashboard answers with this machine's token ("ok"), refuses the token, or does not answer."""
    status, _ = _get_json(f"{cluster.dashboard_url}/api/version", timeout)
    if status == 200:
        return "ok"
    return "refused" if status in (401, 403) else "down"


def cluster_alive(cluster: LocalCluster | None = None, timeout: float = 2.0) -> bool:
    """Whether a Ray dashboard (and so a head node) answers on ``cluster``'s dashboard port."""
    return _dashboard_state(cluster or LocalCluster.from_env(), timeout) != "down"


def _alive_nodes(cluster: LocalCluster) -> int | None:
    """Alive nodes as Ray's state API lists them; None when it does not answer."""
    status, body = _get_json(f"{cluster.dashboard_url}/api/v0/nodes?limit=10000", timeout=10)
    try:
        nodes = body["data"]["result"]["result"]
    except (TypeError, KeyError):
        return None
    return sum(1 for n in nodes if n.get("state") == "ALIVE") if status == 200 else None


# ---------------------------------------------------------------------------------------------------------------
# State file and env file


def _read_state() -> dict[str, dict[str, Any]]:
    """{temp dir: record} of the clusters chatray started; {} when there is no (readable) state file."""
    try:
        data = json.loads(_state_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    clusters = data.get("clusters") if isinstance(data, dict) else None
    return clusters if isinstance(clusters, dict) else {}  # an older single-record file records no temp dir


def _write_state(clusters: dict[str, dict[str, Any]]) -> None:
    path = _state_file()
    if not clusters:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"clusters": clusters}, indent=2), encoding="utf-8")
    tmp.replace(path)


def _record(cluster: LocalCluster, **extra: Any) -> None:
    clusters = _read_state()
    key = str(cluster.ray_temp_dir)
    clusters[key] = {**clusters.get(key, {}), **asdict(cluster), "temp_dir": key, "address": cluster.address,
                     "dashboard": cluster.dashboard_url, **extra}
    _write_state(clusters)


def _forget(cluster: LocalCluster) -> None:
    clusters = _read_state()
    if clusters.pop(str(cluster.ray_temp_dir), None) is not None:
        _write_state(clusters)


def _cluster_from_record(record: Mapping[str, Any]) -> LocalCluster:
    names = {f.name for f in fields(LocalCluster)}
    return LocalCluster(**{k: v for k, v in record.items() if k in names})


def _write_env_file(cluster: LocalCluster) -> Path:
    path = cluster.env_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by chatray (chatray up, cluster/local/start.sh): `source` this file to point Ray's CLIs and SDKs\n"
        "# at the local cluster.\n"
        "export RAY_AUTH_MODE=token\n"
        f"export RAY_ADDRESS={cluster.address}\n"
        f"export RAY_API_SERVER_ADDRESS={cluster.dashboard_url}\n"
        f"export RAY_DASHBOARD_ADDRESS={cluster.dashboard_url}\n", encoding="utf-8")
    return path


def describe_cluster(cluster: LocalCluster, stop_command: str = "chatray down") -> str:
    """How to reach ``cluster``: address, dashboard, where the token is, the env file for clients, its files."""
    url, temp = cluster.dashboard_url, cluster.ray_temp_dir
    return (
        f"Ray cluster:   {cluster.address}     (ray status --address {cluster.address})\n"
        f"Dashboard:     {url}   (also the Jobs API and Serve's REST API)\n"
        f"Token auth:    on; the token is in {token_location()} (print it: ray get-auth-token).\n"
        "               The dashboard asks for it in the browser. CLI/SDK clients need RAY_AUTH_MODE=token:\n"
        f"                 source {cluster.env_file}\n"
        f"                 ray job submit --address {url} -- python -c 'print(1)'\n"
        f"                 serve deploy serve_config.yaml --address {url}\n"
        f"Ray files:     {temp} (logs: {temp}/session_latest/logs)\n"
        f"Stop:          {stop_command}")


# ---------------------------------------------------------------------------------------------------------------
# Start


def start_local_cluster(cluster: LocalCluster | None = None, num_cpus: int | None = None,
                        temp_dir: str | os.PathLike[str] | None = None, wait_s: float = 180.0,
                        extra_env: Mapping[str, str] | None = None, *, num_gpus: int | None = None,
                        ray_args: Sequence[str] = (), echo: Echo | None = None) -> tuple[LocalCluster, bool]:
    """Start ``ray start --head`` on ``cluster``'s addresses unless a cluster already answers there.

    The head runs with token authentication, its own temp dir and the ``CHATRAY_LOCAL_CLUSTER`` marker; it is
    recorded in the state file as soon as ``ray start`` succeeds, and returns once the dashboard, the job agent
    and the Jobs API answer. The env file for clients is written in both cases.

    Args:
        cluster: addresses (default: :meth:`LocalCluster.from_env`); ``agent_port`` / ``client_port`` are filled in.
        num_cpus: CPUs the head offers (default: all).
        temp_dir: Ray's temp dir (overrides ``cluster.temp_dir``; default ``$CHATRAY_HOME/ray``).
        wait_s: how long to wait for Ray to come up after `ray start` returns.
        extra_env: added to the environment of the cluster's processes (workers inherit it).
        num_gpus: GPUs the head offers (default: all detected).
        ray_args: more ``ray start`` arguments.
        echo: called with a line for each step (progress for the CLIs).

    Returns:
        (cluster, started): started is False when an existing cluster was reused.

    Raises:
        ChatrayError: when the ports are taken by something else, ``ray start`` fails, or Ray never comes up.
    """
    say = echo or (lambda _line: None)
    cluster = cluster or LocalCluster.from_env()
    if temp_dir is not None:
        cluster.temp_dir = str(temp_dir)
    env = _ray_env(cluster, extra_env)
    _ensure_token(env, say)
    state = _dashboard_state(cluster)
    if state == "ok":
        say(f"a Ray cluster already answers at {cluster.dashboard_url}: leaving it as it is")
        _write_env_file(cluster)
        return cluster, False
    if state == "refused":
        raise ChatrayError(f"the Ray cluster at {cluster.dashboard_url} does not accept this machine's token",
                           hint="stop it, or use other ports: CHATRAY_RAY_PORT=6380 CHATRAY_DASHBOARD_PORT=8266")
    if _port_open(cluster.host, cluster.gcs_port):
        raise ChatrayError(f"{cluster.address} is in use, but no Ray cluster there accepts this machine's token",
                           hint="stop whatever listens there, or use other ports: "
                                "CHATRAY_RAY_PORT=6380 CHATRAY_DASHBOARD_PORT=8266")
    if _port_open(cluster.dashboard_client_host, cluster.dashboard_port):
        raise ChatrayError(f"the dashboard port {cluster.dashboard_port} is already in use (another Ray?)",
                           hint="stop it, or pick another port: CHATRAY_DASHBOARD_PORT=8266")
    temp = cluster.ray_temp_dir
    if len(str(temp)) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
        raise ChatrayError(f"the Ray temp dir {temp} is too long ({len(str(temp))} characters): Ray's socket "
                           f"paths under it would exceed {_MAX_SOCKET_PATH} bytes",
                           hint=f"use a dir of at most {_MAX_SOCKET_PATH - _SOCKET_SUFFIX} characters "
                                "(CHATRAY_RAY_TEMP_DIR or CHATRAY_HOME)")
    cluster.agent_port = cluster.agent_port or _port_or_free(_DEFAULT_AGENT_PORT)
    cluster.client_port = cluster.client_port or _port_or_free(_DEFAULT_CLIENT_PORT)
    cmd = [ray_executable(), "start", "--head", f"--node-ip-address={cluster.host}", f"--port={cluster.gcs_port}",
           "--include-dashboard=true", f"--dashboard-host={cluster.dashboard_host}",
           f"--dashboard-port={cluster.dashboard_port}", f"--dashboard-agent-listen-port={cluster.agent_port}",
           f"--ray-client-server-port={cluster.client_port}", f"--temp-dir={temp}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    cmd.extend(ray_args)
    temp.mkdir(parents=True, exist_ok=True)
    log = temp / "ray-start.log"
    say(f"starting Ray head on {cluster.address} (dashboard {cluster.dashboard_url}, files in {temp})")
    _run_ray_start(cmd, env, log, what="ray start --head")
    _record(cluster, started_at=time.time(), log=str(log))
    say(f"waiting for the dashboard / Jobs API at {cluster.dashboard_url}")
    _wait_ready(cluster, wait_s, log)
    _write_env_file(cluster)
    return cluster, True


def _run_ray_start(cmd: list[str], env: dict[str, str], log: Path, what: str) -> None:
    with log.open("w", encoding="utf-8") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-30:])
        raise ChatrayError(f"`{what}` failed (exit {r.returncode}); its output ({log}):\n{tail}",
                           hint="another process may hold one of its ports: pick others with CHATRAY_RAY_PORT / "
                                "CHATRAY_DASHBOARD_PORT")


def _wait_ready(cluster: LocalCluster, wait_s: float, log: Path) -> None:
    """Until the dashboard accepts the token, the head's job agent listens and the Jobs API answers."""
    logs = cluster.ray_temp_dir / "session_latest" / "logs"
    stop_hint = "stop it with `chatray down` (or cluster/local/stop.sh)"
    deadline = time.monotonic() + wait_s
    while True:
        state = _dashboard_state(cluster)
        if state == "refused":
            raise ChatrayError(f"Ray started but its dashboard at {cluster.dashboard_url} does not accept this "
                               "machine's token", hint=f"see {log} and {logs}; {stop_hint}")
        if state != "ok":
            missing, log_name = f"the dashboard did not come up at {cluster.dashboard_url}", "dashboard.log"
        elif _port_free(cluster.agent_port or _DEFAULT_AGENT_PORT):
            # Jobs are handed to the head's dashboard agent: submissions fail until it serves HTTP.
            missing, log_name = (f"the head's dashboard agent is not listening on port {cluster.agent_port}: "
                                 "jobs could not be submitted"), "dashboard_agent.log"
        elif _get_json(f"{cluster.dashboard_url}/api/jobs/", timeout=10)[0] != 200:
            missing, log_name = f"the Jobs API at {cluster.dashboard_url} does not answer", "dashboard.log"
        else:
            return
        if time.monotonic() > deadline:
            raise ChatrayError(f"Ray started, but {missing} within {wait_s:.0f} s",
                               hint=f"see {logs / log_name}; {stop_hint}")
        time.sleep(0.5)


def add_local_worker(cluster: LocalCluster | None = None, ray_args: Sequence[str] = (), wait_s: float = 180.0,
                     echo: Echo | None = None) -> int:
    """Join one more Ray node (a second raylet on this machine) to the local head.

    It uses the head's temp dir and marker, so stopping the cluster stops it too. ``--num-cpus 1`` unless
    ``ray_args`` says otherwise.

    Returns:
        The number of alive nodes once the head lists the new one.

    Raises:
        ChatrayError: when no head answers, ``ray start`` fails, or the head never lists the new node.
    """
    say = echo or (lambda _line: None)
    cluster = cluster or LocalCluster.from_env()
    env = _ray_env(cluster)
    if _dashboard_state(cluster) != "ok":
        raise ChatrayError(f"no Ray cluster answers at {cluster.dashboard_url} with this machine's token",
                           hint="start the head first: cluster/local/start.sh (or chatray up)")
    args = list(ray_args)
    if not any(a == "--num-cpus" or a.startswith("--num-cpus=") for a in args):
        args += ["--num-cpus", "1"]
    before = _alive_nodes(cluster)
    if before is None:
        raise ChatrayError(f"Ray's state API at {cluster.dashboard_url} does not answer: cannot tell when the "
                           "new node joins", hint="is the head still starting? try again in a few seconds")
    temp = cluster.ray_temp_dir
    cmd = [ray_executable(), "start", f"--address={cluster.address}", f"--node-ip-address={cluster.host}",
           f"--temp-dir={temp}", f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", *args]
    say(f"adding a worker node to {cluster.address}: ray start --address {cluster.address} {' '.join(args)}")
    log = temp / "ray-add-worker.log"
    _run_ray_start(cmd, env, log, what=f"ray start --address {cluster.address}")
    deadline = time.monotonic() + wait_s
    while (now := _alive_nodes(cluster) or 0) <= before:
        if time.monotonic() > deadline:
            raise ChatrayError(f"the worker started but the head does not list it after {wait_s:.0f} s",
                               hint=f"see {log}")
        time.sleep(1)
    say(f"worker node joined: {now} nodes alive (ray status --address {cluster.address})")
    return now


# ---------------------------------------------------------------------------------------------------------------
# Stop


def _psutil() -> ModuleType:
    """psutil; Ray ships it in ray/thirdparty_files (what `ray stop` itself uses) when it is not installed."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")  # locates Ray without importing it (slow)
        if spec is None or not spec.submodule_search_locations:
            raise ChatrayError("neither psutil nor Ray is installed", hint="pip install 'ray[default]'") from None
        sys.path.append(str(Path(list(spec.submodule_search_locations)[0]) / "thirdparty_files"))
        import psutil
    return psutil


def _dir_forms(path: str | os.PathLike[str]) -> set[str]:
    """A dir as given (absolute) and as resolved: it may sit behind a symlink."""
    return {os.path.abspath(os.path.expanduser(path)), os.path.realpath(os.path.expanduser(path))}


def _belongs(info: Mapping[str, Any], dirs: set[str], by_flags: bool) -> bool:
    """Whether a process (psutil's ``info``: environ, cmdline) is one of the cluster with temp dir ``dirs``."""
    marker = (info.get("environ") or {}).get(MARKER_ENV)
    if marker and _dir_forms(marker) & dirs:
        return True
    if not by_flags:
        return False
    # Ray's own processes name their dirs: --temp_dir=..., --session-dir=..., --log_dir=..., --logs-dir=...
    for arg in info.get("cmdline") or ():
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if flag.replace("_", "-") in _DIR_FLAGS and any(value == d or value.startswith(d + os.sep) for d in dirs):
                return True
    return False


def cluster_processes(temp_dir: str | os.PathLike[str]) -> list[Any]:
    """The running processes of the local cluster whose Ray temp dir is ``temp_dir``, as ``psutil.Process``.

    Those of this user that carry ``CHATRAY_LOCAL_CLUSTER=<temp dir>`` in their environment (set at start,
    inherited by all of them) or, as Ray's own processes do, name a dir inside it with ``--temp-dir=`` /
    ``--session-dir=`` / ``--log-dir=`` / ``--logs-dir=``; plus all their descendants (workers rename
    themselves ``ray::...`` and may lose their readable environment). Never this process or its ancestors.
    When ``temp_dir`` is Ray's shared default (``/tmp/ray``), only the marker counts: other Rays use it too.
    """
    psutil = _psutil()
    dirs = _dir_forms(temp_dir)
    by_flags = not dirs & _dir_forms(Path(tempfile.gettempdir()) / "ray") and not dirs & _dir_forms("/tmp/ray")
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    uid = os.getuid() if hasattr(os, "getuid") else None
    found: dict[int, Any] = {}
    for p in psutil.process_iter(["uids", "cmdline", "environ"], ad_value=None):
        uids = p.info.get("uids")
        if p.pid in skip or (uid is not None and uids is not None and uids.real != uid):
            continue
        if _belongs(p.info, dirs, by_flags):
            found.setdefault(p.pid, p)
            try:
                for child in p.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                pass
    for pid in skip:
        found.pop(pid, None)
    return sorted(found.values(), key=lambda p: p.pid)


def _running(p: Any) -> bool:
    psutil = _psutil()
    try:
        # A zombie has exited; its parent (or an init that does not reap) just has not collected it yet.
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def _stop_order(p: Any) -> int:
    """As `ray stop`: the raylet first (its agents fate-share with it), the GCS last (others report to it)."""
    try:
        name = p.name()
    except _psutil().Error:  # gone already
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def stop_cluster_processes(temp_dir: str | os.PathLike[str], grace_s: float = 16.0) -> tuple[int, list[str]]:
    """Stop the processes of the local cluster with Ray temp dir ``temp_dir`` (:func:`cluster_processes`).

    Like ``ray stop``, restricted to this cluster: SIGTERM to the raylets, then to the other processes, then
    to the GCS, each group getting a third of ``grace_s`` seconds before SIGKILL. Other Ray instances on the
    machine keep running. Processes that appear while stopping are stopped in a second round.

    Returns:
        (how many processes were stopped, names of those that needed SIGKILL).
    """
    psutil = _psutil()
    stopped, killed = 0, []
    for _round in range(2):
        procs = cluster_processes(temp_dir)
        if not procs:
            break
        stopped += len(procs)
        orders = [_stop_order(p) for p in procs]
        for order in range(3):
            group = [p for p, o in zip(procs, orders) if o == order]
            for p in group:
                try:
                    p.terminate()  # psutil checks the pid still names the same process (no pid-reuse accidents)
                except psutil.Error:
                    pass
            alive = _wait_gone(group, grace_s / 3)
            for p in alive:
                try:
                    killed.append(p.name())
                except psutil.Error:
                    killed.append(str(p.pid))
                try:
                    p.kill()
                except psutil.Error:
                    pass
            _wait_gone(alive, 5.0)
    return stopped, killed


def _serve_running(cluster: LocalCluster) -> bool:
    status, body = _get_json(f"{cluster.dashboard_url}/api/serve/applications/", timeout=10)
    if status != 200 or not isinstance(body, dict):
        return True  # unknown: let `serve shutdown` find out
    return bool((body.get("controller_info") or {}).get("node_id"))


def _shutdown_serve(cluster: LocalCluster) -> str:
    """``serve shutdown`` when Serve runs, so replicas drain and the HTTP proxy lets go of its port."""
    if not _serve_running(cluster):
        return "Serve was not running"
    try:
        r = subprocess.run([_cli("serve"), "shutdown", "-y", "-a", cluster.dashboard_url], capture_output=True,
                           text=True, env=ray_auth_env(), timeout=120)
    except subprocess.TimeoutExpired:
        return "warning: serve shutdown did not finish within 120 s; stopping Ray anyway"
    if r.returncode != 0:
        return f"warning: serve shutdown failed ({(r.stderr or r.stdout).strip()[-200:]}); stopping Ray anyway"
    return "Serve shut down"


def stop_local_cluster(force: bool = False, cluster: LocalCluster | None = None, *, every_ray: bool = False,
                       grace_s: float = 16.0, echo: Echo | None = None) -> list[str]:
    """Shut down Serve and stop the local cluster that :func:`start_local_cluster` started, and only it.

    The cluster is the one in ``cluster``'s temp dir (default: :meth:`LocalCluster.from_env`, whose addresses
    the state file's record of that temp dir replaces). Its processes are found by that temp dir
    (:func:`cluster_processes`) and stopped with SIGTERM, then SIGKILL after ``grace_s`` seconds.

    Args:
        force: also stop them when the state file has no record of chatray starting a cluster in that temp dir
            (e.g. the file was deleted, or CHATRAY_HOME changed). Still only processes of that temp dir.
        every_ray: run plain ``ray stop`` instead, which stops EVERY Ray process of this user on the machine
            (``cluster/local/stop.sh --all``; not offered by ``chatray down``).
        echo: called with each line as it happens.

    Returns:
        What was done, as short lines for the user.

    Raises:
        ChatrayError: when, after stopping, something still listens on the cluster's address (a Ray started
            outside chatray there): it is left running.
    """
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if echo:
            echo(line)

    state = _read_state()
    if cluster is None:
        cluster = LocalCluster.from_env()
        record = state.get(str(cluster.ray_temp_dir))
        if record:
            cluster = _cluster_from_record(record)
    temp = cluster.ray_temp_dir
    recorded = str(temp) in state
    if every_ray:
        if _dashboard_state(cluster) == "ok":  # a dashboard that refuses this machine's token cannot drain Serve
            say(_shutdown_serve(cluster))
        say("ray stop (every Ray process of this user on this machine)")
        r = subprocess.run([ray_executable(), "stop"], capture_output=True, text=True, timeout=180)
        say("stopped" if r.returncode == 0 else f"warning: ray stop failed: {r.stderr.strip()[-300:]}")
        _cleanup(cluster)
        return lines

    procs = cluster_processes(temp)
    if not recorded and not force:
        if procs:
            say(f"{len(procs)} Ray processes of {temp} are running, but chatray has no record of starting them "
                f"({_state_file()}): left running; --force stops them")
        elif cluster_alive(cluster):
            say(f"a Ray cluster chatray did not start answers at {cluster.dashboard_url} (it is not in {temp}): "
                "left running")
        else:
            say("nothing to stop")
        return lines
    if procs and _dashboard_state(cluster) == "ok":  # the cluster answering there is this one: drain Serve
        say(_shutdown_serve(cluster))
    stopped, killed = stop_cluster_processes(temp, grace_s=grace_s)
    if stopped:
        say(f"local Ray cluster stopped: {stopped} processes of {temp}"
            + (f" (SIGKILL for {', '.join(killed)})" if killed else ""))
    else:
        say(f"no processes of the local cluster in {temp} were running")
    _cleanup(cluster)
    if _port_open(cluster.host, cluster.gcs_port):
        raise ChatrayError(f"something still listens on {cluster.address}: not a process of {temp} (a Ray started "
                           "outside chatray?), left running",
                           hint="`ray stop` (or cluster/local/stop.sh --all) stops every Ray process of this user "
                                "on this machine")
    return lines


def _cleanup(cluster: LocalCluster) -> None:
    _forget(cluster)
    cluster.env_file.unlink(missing_ok=True)
    (cluster.ray_temp_dir / "ray_current_cluster").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# `python -m chatray.localcluster`: what cluster/local/*.sh run


_USAGE = """\
usage: python -m chatray.localcluster start [RAY_START_ARGS...]
       python -m chatray.localcluster add-worker [RAY_START_ARGS...]
       python -m chatray.localcluster stop [--all]

start       start a single-node Ray cluster (ray start --head) unless one answers; print how to reach it
add-worker  join one more Ray node on this machine to it (--num-cpus 1 unless given)
stop        shut Serve down, then stop this cluster's Ray processes only (those of its temp dir);
            --all runs plain `ray stop` instead, which stops EVERY Ray process of this user on the machine

Settings come from the environment: CHATRAY_RAY_HOST, CHATRAY_RAY_PORT, CHATRAY_DASHBOARD_HOST,
CHATRAY_DASHBOARD_PORT, CHATRAY_DASHBOARD_AGENT_PORT, CHATRAY_RAY_CLIENT_PORT, CHATRAY_RAY_TEMP_DIR,
CHATRAY_NUM_CPUS, CHATRAY_NUM_GPUS, CHATRAY_START_TIMEOUT (see cluster/local/_env.sh)."""


def _env_number(name: str, kind: type[int] | type[float]) -> Any:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ChatrayError(f"{name} must be {'a whole' if kind is int else 'a'} number, got {value!r}") from None


def resources_from_env() -> dict[str, int | None]:
    """``num_cpus`` / ``num_gpus`` for :func:`start_local_cluster` from CHATRAY_NUM_CPUS / CHATRAY_NUM_GPUS
    (None, i.e. all of the machine's, when unset).

    Raises:
        ChatrayError: a value that is not a whole number.
    """
    return {"num_cpus": _env_number("CHATRAY_NUM_CPUS", int), "num_gpus": _env_number("CHATRAY_NUM_GPUS", int)}


def _say(line: str) -> None:
    print(f"==> {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m chatray.localcluster``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command in ("-h", "--help") or "-h" in rest or "--help" in rest:
        print(_USAGE)
        return 0
    if command not in ("start", "stop", "add-worker") or (command == "stop" and rest not in ([], ["--all"])):
        print(_USAGE, file=sys.stderr)
        return 2
    try:
        cluster = LocalCluster.from_env()
        wait_s = _env_number("CHATRAY_START_TIMEOUT", float) or 180.0
        if command == "start":
            cluster, started = start_local_cluster(cluster, **resources_from_env(), wait_s=wait_s, ray_args=rest,
                                                   echo=_say)
            print(("==> Ray is up\n" if started else "") + "\n" + describe_cluster(cluster, "cluster/local/stop.sh"))
        elif command == "add-worker":
            add_local_worker(cluster, ray_args=rest, wait_s=wait_s, echo=_say)
        else:
            # The cluster of CHATRAY_RAY_TEMP_DIR, with the addresses recorded at its start; no record needed.
            stop_local_cluster(force=True, every_ray=rest == ["--all"], echo=_say)
    except (ChatrayError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)  # type: ignore[union-attr]
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
