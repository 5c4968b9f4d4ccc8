"""Starting a local cluster: the head (``ray start --head`` on 127.0.0.1, token auth on, its own temp dir) and
more worker nodes on the same machine, each marked with :data:`MARKER_ENV` so that stopping finds them all.

On 127.0.0.1 (the default) every process of the cluster listens on loopback only (Ray's local-only mode,
:func:`chatray.rayenv.ray_host_env`); another ``host`` is an explicit choice to listen on every interface, warned
about at start. More nodes join in either mode (on loopback through :mod:`chatray.localcluster.worker_node`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from chatray.errors import ChatrayError
from chatray.localcluster import worker_node
from chatray.localcluster.probes import (
    alive_nodes,
    dashboard_state,
    free_port,
    get_json,
    port_free,
    port_open,
    port_or_free,
)
from chatray.localcluster.settings import (
    DEFAULT_AGENT_PORT,
    DEFAULT_CLIENT_PORT,
    MARKER_ENV,
    NODE_ENV,
    START_TIMEOUT_S,
    Echo,
    LocalCluster,
    ray_executable,
)
from chatray.localcluster.state import record_cluster, write_env_file
from chatray.rayenv import WILDCARD_HOSTS, exposure_warning, is_loopback, ray_host_env, serve_env, token_file

__all__ = ["add_local_worker", "ray_start_env", "start_local_cluster"]

# Ray's Unix sockets live at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, and a socket path
# has at most 107 bytes on Linux (103 on macOS): longer temp dirs make Ray fail at start with obscure errors.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
_OTHER_PORTS_HINT = "CHATRAY_RAY_PORT=6380 CHATRAY_DASHBOARD_PORT=8266"


def _ensure_token(env: Mapping[str, str], echo: Echo) -> None:
    """Make sure a Ray auth token exists: ``ray start --head`` then turns token auth on, and clients here read it.

    Creates ``~/.ray/auth_token`` (``ray get-auth-token --generate``, mode 600) when ``env`` names no token.

    Raises:
        ChatrayError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file, or the token cannot be created.
    """
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


def ray_start_env(cluster: LocalCluster, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``ray start`` for ``cluster``, which every process of the cluster inherits: token auth
    on, where Ray listens (:func:`~chatray.rayenv.ray_host_env` of ``cluster.host``), Serve's data plane
    settings, this Python first on PATH, the cluster's marker.

    Raises:
        ChatrayError: ``RAY_AUTH_MODE`` asks for anything but token authentication.
    """
    env = {**os.environ, **(extra_env or {})}
    mode = env.get("RAY_AUTH_MODE") or "token"
    if mode.lower() != "token":
        raise ChatrayError(f"RAY_AUTH_MODE={mode}: chatray's local cluster always uses token authentication",
                           hint="unset RAY_AUTH_MODE (or set it to token)")
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    env.update(ray_host_env(cluster.host))  # loopback only, unless the cluster's host says otherwise
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = serve_env(env)  # Serve's gRPC data plane, unless the caller's environment says otherwise
    # Job drivers run `python ...` from the raylet's PATH: make that this environment's Python (the venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    # Inherited by every process of the cluster: stop_cluster_processes() finds them by it.
    env[MARKER_ENV] = str(cluster.ray_temp_dir)
    return env


def _settle_host(cluster: LocalCluster) -> None:
    """The address Ray's node gets for ``cluster.host``: 127.0.0.1 for any loopback name (Ray binds its gRPC
    servers to loopback for exactly that address); for a wildcard (0.0.0.0, ::, meaning every interface) the
    address this machine's default route leaves from, as Ray picks it, since Ray still advertises one.

    Raises:
        ChatrayError: a wildcard with no such route (offline).
    """
    if is_loopback(cluster.host):
        cluster.host = "127.0.0.1"
    if cluster.host not in WILDCARD_HOSTS:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))  # UDP: only picks the route, sends nothing
            cluster.host = s.getsockname()[0]
        except OSError as e:
            raise ChatrayError(f"cannot tell this machine's network address for host {cluster.host}: "
                               f"{e.strerror or e}",
                               hint="name it: CHATRAY_RAY_HOST=<this machine's address>") from None


def _warn_if_exposed(cluster: LocalCluster) -> None:
    """One line on stderr for each part of the cluster that is not on loopback (an explicit choice)."""
    if not is_loopback(cluster.host):
        print(exposure_warning(cluster.host, "Ray (GCS, raylets, workers, agents)"), file=sys.stderr, flush=True)
    if not is_loopback(cluster.dashboard_host):
        print(exposure_warning(cluster.dashboard_host, "the dashboard (and its Jobs API)"), file=sys.stderr,
              flush=True)


def _check_can_start(cluster: LocalCluster, state: str) -> None:
    """Refuse to start where the ports are taken by something else or the temp dir is too long for Ray."""
    if state == "refused":
        raise ChatrayError(f"the Ray cluster at {cluster.dashboard_url} does not accept this machine's token",
                           hint=f"stop it, or use other ports: {_OTHER_PORTS_HINT}")
    if port_open(cluster.host, cluster.gcs_port):
        raise ChatrayError(f"{cluster.address} is in use, but no Ray cluster there accepts this machine's token",
                           hint=f"stop whatever listens there, or use other ports: {_OTHER_PORTS_HINT}")
    if port_open(cluster.dashboard_client_host, cluster.dashboard_port):
        raise ChatrayError(f"the dashboard port {cluster.dashboard_port} is already in use (another Ray?)",
                           hint="stop it, or pick another port: CHATRAY_DASHBOARD_PORT=8266")
    temp = cluster.ray_temp_dir
    if len(str(temp)) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
        raise ChatrayError(f"the Ray temp dir {temp} is too long ({len(str(temp))} characters): Ray's socket "
                           f"paths under it would exceed {_MAX_SOCKET_PATH} bytes",
                           hint=f"use a dir of at most {_MAX_SOCKET_PATH - _SOCKET_SUFFIX} characters "
                                "(CHATRAY_RAY_TEMP_DIR or CHATRAY_HOME)")


def _head_command(cluster: LocalCluster, num_cpus: int | None, num_gpus: int | None,
                  ray_args: Sequence[str]) -> list[str]:
    cmd = [ray_executable(), "start", "--head", f"--node-ip-address={cluster.host}", f"--port={cluster.gcs_port}",
           "--include-dashboard=true", f"--dashboard-host={cluster.dashboard_host}",
           f"--dashboard-port={cluster.dashboard_port}", f"--dashboard-agent-listen-port={cluster.agent_port}",
           f"--ray-client-server-port={cluster.client_port}", f"--temp-dir={cluster.ray_temp_dir}",
           "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return [*cmd, *ray_args]


def start_local_cluster(cluster: LocalCluster | None = None, num_cpus: int | None = None,
                        temp_dir: str | os.PathLike[str] | None = None, wait_s: float = START_TIMEOUT_S,
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
    _settle_host(cluster)
    env = ray_start_env(cluster, extra_env)
    _ensure_token(env, say)
    state = dashboard_state(cluster)
    if state == "ok":
        say(f"a Ray cluster already answers at {cluster.dashboard_url}: leaving it as it is")
        write_env_file(cluster)
        return cluster, False
    _check_can_start(cluster, state)
    cluster.agent_port = cluster.agent_port or port_or_free(DEFAULT_AGENT_PORT)
    cluster.client_port = cluster.client_port or port_or_free(DEFAULT_CLIENT_PORT)
    temp = cluster.ray_temp_dir
    temp.mkdir(parents=True, exist_ok=True)
    log = temp / "ray-start.log"
    say(f"starting Ray head on {cluster.address} (dashboard {cluster.dashboard_url}, files in {temp})")
    _warn_if_exposed(cluster)
    _run_ray_start(_head_command(cluster, num_cpus, num_gpus, ray_args), env, log, what="ray start --head")
    record_cluster(cluster, started_at=time.time(), log=str(log))
    say(f"waiting for the dashboard / Jobs API at {cluster.dashboard_url}")
    _wait_ready(cluster, wait_s, log)
    write_env_file(cluster)
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
        state = dashboard_state(cluster)
        if state == "refused":
            raise ChatrayError(f"Ray started but its dashboard at {cluster.dashboard_url} does not accept this "
                               "machine's token", hint=f"see {log} and {logs}; {stop_hint}")
        if state != "ok":
            missing, log_name = f"the dashboard did not come up at {cluster.dashboard_url}", "dashboard.log"
        elif port_free(cluster.agent_port or DEFAULT_AGENT_PORT):
            # Jobs are handed to the head's dashboard agent: submissions fail until it serves HTTP.
            missing, log_name = (f"the head's dashboard agent is not listening on port {cluster.agent_port}: "
                                 "jobs could not be submitted"), "dashboard_agent.log"
        elif get_json(f"{cluster.dashboard_url}/api/jobs/", timeout=10)[0] != 200:
            missing, log_name = f"the Jobs API at {cluster.dashboard_url} does not answer", "dashboard.log"
        else:
            return
        if time.monotonic() > deadline:
            raise ChatrayError(f"Ray started, but {missing} within {wait_s:.0f} s",
                               hint=f"see {logs / log_name}; {stop_hint}")
        time.sleep(0.5)


def _worker_command(cluster: LocalCluster, args: Sequence[str]) -> list[str]:
    """``ray start --address`` for one more node; on a loopback head through :mod:`.worker_node`, which lets Ray's
    CLI start a worker node in local-only mode (everything of the new node then listens on 127.0.0.1 too)."""
    temp = cluster.ray_temp_dir
    common = [f"--address={cluster.address}", f"--node-ip-address={cluster.host}", f"--temp-dir={temp}",
              f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args]
    if is_loopback(cluster.host):
        return [sys.executable, str(Path(worker_node.__file__)), *common]  # imports only Ray: no PYTHONPATH needed
    return [ray_executable(), "start", *common]


def add_local_worker(cluster: LocalCluster | None = None, ray_args: Sequence[str] = (),
                     wait_s: float = START_TIMEOUT_S, echo: Echo | None = None, *, name: str | None = None) -> int:
    """Join one more Ray node (a second raylet on this machine, with its own CPUs and object store) to the head.

    It uses the head's temp dir and marker, so stopping the cluster stops it too. ``--num-cpus 1`` unless
    ``ray_args`` says otherwise. On a loopback head (the default) the node joins in Ray's local-only mode and all
    its servers listen on 127.0.0.1, like the head's (:mod:`chatray.localcluster.worker_node` says how).

    Args:
        cluster: the head's addresses (default: :meth:`LocalCluster.from_env`).
        ray_args: more ``ray start`` arguments (``--num-cpus``, ``--resources``, ...).
        wait_s: how long to wait for the head to list the new node.
        echo: called with a line for each step.
        name: the node's name in ``CHATRAY_LOCAL_NODE`` of its processes, which
            :func:`~chatray.localcluster.processes.kill_node` finds it by (default ``worker-<alive nodes>``).

    Returns:
        The number of alive nodes once the head lists the new one.

    Raises:
        ChatrayError: when no head answers, ``ray start`` fails, or the head never lists the new node.
    """
    say = echo or (lambda _line: None)
    cluster = cluster or LocalCluster.from_env()
    _settle_host(cluster)
    if dashboard_state(cluster) != "ok":
        raise ChatrayError(f"no Ray cluster answers at {cluster.dashboard_url} with this machine's token",
                           hint="start the head first: cluster/local/start.sh (or chatray up)")
    args = list(ray_args)
    if not any(a == "--num-cpus" or a.startswith("--num-cpus=") for a in args):
        args += ["--num-cpus", "1"]
    before = alive_nodes(cluster)
    if before is None:
        raise ChatrayError(f"Ray's state API at {cluster.dashboard_url} does not answer: cannot tell when the "
                           "new node joins", hint="is the head still starting? try again in a few seconds")
    env = {**ray_start_env(cluster), NODE_ENV: name or f"worker-{before}"}
    temp = cluster.ray_temp_dir
    say(f"adding a worker node to {cluster.address}: ray start --address {cluster.address} {' '.join(args)}")
    log = temp / "ray-add-worker.log"
    _run_ray_start(_worker_command(cluster, args), env, log, what=f"ray start --address {cluster.address}")
    deadline = time.monotonic() + wait_s
    while (now := alive_nodes(cluster) or 0) <= before:
        if time.monotonic() > deadline:
            raise ChatrayError(f"the worker started but the head does not list it after {wait_s:.0f} s",
                               hint=f"see {log}")
        time.sleep(1)
    say(f"worker node joined: {now} nodes alive (source {cluster.env_file}; ray status)")
    return now
