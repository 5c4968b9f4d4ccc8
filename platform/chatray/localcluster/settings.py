"""Where a local cluster lives and listens: :class:`LocalCluster` from ``CHATRAY_*`` variables, chatray's home
(the state file), the Ray CLIs to run, and the numbers (CPUs, GPUs, timeouts) read from the environment."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from chatray.errors import ChatrayError

__all__ = [
    "DEFAULT_AGENT_PORT",
    "DEFAULT_CLIENT_PORT",
    "MARKER_ENV",
    "NODE_ENV",
    "START_TIMEOUT_S",
    "STOP_GRACE_S",
    "Echo",
    "LocalCluster",
    "cli_executable",
    "default_temp_dir",
    "env_number",
    "ray_executable",
    "resources_from_env",
    "state_file",
]

MARKER_ENV = "CHATRAY_LOCAL_CLUSTER"  # = the cluster's Ray temp dir, in the environment of all its processes
NODE_ENV = "CHATRAY_LOCAL_NODE"  # = a worker node's name (worker-1, ...), in the environment of its processes
# Ray's own defaults; another Ray on the machine may hold them, and then a free port is taken instead.
DEFAULT_AGENT_PORT = 52365
DEFAULT_CLIENT_PORT = 10001
START_TIMEOUT_S = 180.0  # how long to wait for each part of Ray to come up (CHATRAY_START_TIMEOUT)
STOP_GRACE_S = 16.0  # SIGTERM to SIGKILL, over the three stop groups (raylets, the rest, the GCS)

Echo = Callable[[str], None]


def _chatray_home() -> Path:
    return Path(os.environ.get("CHATRAY_HOME") or Path.home() / ".chatray").expanduser()


def state_file() -> Path:
    """Records the clusters chatray started, by temp dir (so ``chatray down`` stops only what it started)."""
    return _chatray_home() / "local-cluster.json"


def default_temp_dir() -> Path:
    """The local cluster's Ray temp dir unless one is given: ``$CHATRAY_HOME/ray`` (``~/.chatray/ray``)."""
    return _chatray_home() / "ray"


@dataclass
class LocalCluster:
    """Addresses and Ray temp dir of a local cluster."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    host: str = "127.0.0.1"  # advertised; loopback keeps every process on it, else all interfaces (0.0.0.0 ok)
    agent_port: int | None = None  # the head's job agent (DEFAULT_AGENT_PORT, else a free port, when None)
    dashboard_host: str = "127.0.0.1"  # dashboard + Jobs API + Serve REST API bind address
    client_port: int | None = None  # Ray Client server, ray:// (DEFAULT_CLIENT_PORT, else a free port, when None)
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
        """The cluster address (GCS), ``host:port``."""
        return f"{self.host}:{self.gcs_port}"

    @property
    def dashboard_client_host(self) -> str:
        """Where clients reach the dashboard: a wildcard bind is still reached through the advertised host."""
        return self.host if self.dashboard_host in ("0.0.0.0", "::", "[::]") else self.dashboard_host

    @property
    def dashboard_url(self) -> str:
        """The dashboard, Jobs API and Serve REST API: ``http://host:port``."""
        return f"http://{self.dashboard_client_host}:{self.dashboard_port}"

    @property
    def ray_temp_dir(self) -> Path:
        """The temp dir as an absolute path (its string is how the state file and the marker name it)."""
        return Path(os.path.abspath(Path(self.temp_dir or default_temp_dir()).expanduser()))

    @property
    def env_file(self) -> Path:
        """``source`` it to point Ray's CLIs and SDKs at this cluster (written at start)."""
        return self.ray_temp_dir / "chatray-cluster.env"


def ray_executable() -> str:
    """The ``ray`` CLI next to this Python (the venv's), else the one on PATH."""
    return cli_executable("ray")


def cli_executable(name: str) -> str:
    """The console script ``name`` (``ray``, ``serve``) next to this Python, else the one on PATH.

    Raises:
        ChatrayError: when neither exists.
    """
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ChatrayError(f"the `{name}` command was not found", hint="pip install 'ray[default,serve]'")
    return found


def env_number(name: str, kind: type[int] | type[float]) -> int | float | None:
    """The number in environment variable ``name``, or None when it is unset or empty.

    Raises:
        ChatrayError: a value that is not a number of ``kind``.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ChatrayError(f"{name} must be {'a whole' if kind is int else 'a'} number, got {value!r}") from None


def resources_from_env() -> dict[str, int | None]:
    """``num_cpus`` / ``num_gpus`` for :func:`~chatray.localcluster.start.start_local_cluster` from
    CHATRAY_NUM_CPUS / CHATRAY_NUM_GPUS (None, i.e. all of the machine's, when unset).

    Raises:
        ChatrayError: a value that is not a whole number.
    """
    return {"num_cpus": env_number("CHATRAY_NUM_CPUS", int), "num_gpus": env_number("CHATRAY_NUM_GPUS", int)}
