"""A single-node Ray cluster on 127.0.0.1 for laptops and CI: start, check, stop.

``ray start --head`` in Ray >= 2.5x turns on token authentication and writes the token to
``~/.ray/auth_token``; clients (Jobs SDK, ``serve deploy``) then need ``RAY_AUTH_MODE=token``.
:func:`ray_auth_env` provides exactly that, so nothing here turns authentication off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from chatray.errors import ChatrayError

__all__ = [
    "LocalCluster",
    "cluster_alive",
    "ray_auth_env",
    "ray_auth_headers",
    "ray_executable",
    "start_local_cluster",
    "stop_local_cluster",
]

def _state_file() -> Path:
    """Marks a cluster that chatray started (so `chatray down` stops only what it started)."""
    return Path(os.environ.get("CHATRAY_HOME", Path.home() / ".chatray")) / "local-cluster.json"


@dataclass
class LocalCluster:
    """Addresses of a local cluster."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    host: str = "127.0.0.1"
    agent_port: int | None = None  # the per-node job agent (Ray's default 52365 when None)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"


def ray_executable() -> str:
    """The ``ray`` CLI next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    if here.exists():
        return str(here)
    found = shutil.which("ray")
    if not found:
        raise ChatrayError("the `ray` command was not found", hint="pip install 'ray[default]'")
    return found


def ray_auth_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) plus ``RAY_AUTH_MODE=token`` when a Ray auth token is available.

    The token itself is read by Ray from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
    """
    out = dict(os.environ if env is None else env)
    if "RAY_AUTH_MODE" not in out:
        token_file = Path(out.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if out.get("RAY_AUTH_TOKEN") or token_file.is_file():
            out["RAY_AUTH_MODE"] = "token"
    return out


def ray_auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` for Ray's HTTP APIs when a token is available, else ``{}``."""
    env = ray_auth_env()
    token = env.get("RAY_AUTH_TOKEN")
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not token and path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


_DEFAULT_AGENT_PORT = 52365


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    # Ray's agent binds the node IP or all interfaces: check those too.
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_alive(cluster: LocalCluster | None = None, timeout: float = 2.0) -> bool:
    """Whether a Ray dashboard (and so a head node) answers on ``cluster``'s dashboard port."""
    cluster = cluster or LocalCluster()
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/version", headers=ray_auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)  # alive, just refusing us
    except (urllib.error.URLError, OSError):
        return False


def start_local_cluster(cluster: LocalCluster | None = None, num_cpus: int | None = None,
                        temp_dir: str | None = None, wait_s: float = 90.0,
                        extra_env: dict[str, str] | None = None) -> tuple[LocalCluster, bool]:
    """Start ``ray start --head`` on 127.0.0.1 unless a cluster already answers there.

    Returns:
        (cluster, started): started is False when an existing cluster was reused.

    Raises:
        ChatrayError: when ``ray start`` fails or the dashboard never comes up.
    """
    cluster = cluster or LocalCluster()
    if cluster_alive(cluster):
        return cluster, False
    cmd = [ray_executable(), "start", "--head", f"--node-ip-address={cluster.host}", f"--port={cluster.gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}", "--disable-usage-stats"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if not cluster.agent_port:
        # Ray's job agent always wants 52365; another Ray on this machine (a test suite's ray.init()) may hold
        # it, and jobs then fail with "No available agent to submit job". Take a free port instead.
        cluster.agent_port = _DEFAULT_AGENT_PORT if _port_free(_DEFAULT_AGENT_PORT) else _free_port()
    cmd.append(f"--dashboard-agent-listen-port={cluster.agent_port}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    env = dict(os.environ if extra_env is None else {**os.environ, **extra_env})
    env.pop("RAY_ADDRESS", None)
    # Job drivers run `python ...` from the raylet's PATH: make that this environment's Python (the venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise ChatrayError(f"`ray start --head` failed (exit {r.returncode}):\n{tail}",
                           hint="is another Ray using port 6379? `ray stop` stops it")
    deadline = time.time() + wait_s
    while not (cluster_alive(cluster) and not _port_free(cluster.agent_port)):
        if time.time() > deadline:
            raise ChatrayError(f"Ray started but its dashboard/job agent never answered at {cluster.dashboard_url}")
        time.sleep(1)
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps({"address": cluster.address, "dashboard": cluster.dashboard_url,
                                      "started_at": time.time()}))
    return cluster, True


def stop_local_cluster(force: bool = False, cluster: LocalCluster | None = None) -> list[str]:
    """Shut down Serve and stop the local cluster that :func:`start_local_cluster` started.

    Args:
        force: stop a running local Ray even if chatray did not start it.

    Returns:
        What was done, as short lines for the user.
    """
    done: list[str] = []
    cluster = cluster or LocalCluster()
    ours = _state_file().exists()
    if cluster_alive(cluster):
        serve = Path(sys.executable).parent / "serve"
        r = subprocess.run([str(serve) if serve.exists() else "serve", "shutdown", "-y", "-a", cluster.dashboard_url],
                           capture_output=True, text=True, env=ray_auth_env(), timeout=120)
        done.append("Serve shut down" if r.returncode == 0 else "Serve was not running")
    if ours or force:
        r = subprocess.run([ray_executable(), "stop", "--force"] if force else [ray_executable(), "stop"],
                           capture_output=True, text=True, timeout=180)
        done.append("local Ray cluster stopped" if r.returncode == 0 else f"ray stop failed: {r.stderr.strip()}")
        _state_file().unlink(missing_ok=True)
    elif cluster_alive(cluster):
        done.append("a Ray cluster chatray did not start is still running (use --force to stop it)")
    if not done:
        done.append("nothing to stop")
    return done
