"""What answers where: free and open ports, the dashboard (with this machine's Ray token), alive nodes, Serve."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any, Literal

from chatray.localcluster.settings import LocalCluster
from chatray.rayenv import ray_auth_headers

__all__ = [
    "alive_nodes",
    "cluster_alive",
    "dashboard_state",
    "free_port",
    "get_json",
    "port_free",
    "port_open",
    "port_or_free",
    "serve_running",
]


def port_free(port: int) -> bool:
    """Whether nothing is bound to ``port`` on 127.0.0.1 nor on all interfaces."""
    for host in ("127.0.0.1", "0.0.0.0"):  # Ray's agent binds the node IP or all interfaces: check both
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A port nothing is bound to on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_or_free(wanted: int) -> int:
    """``wanted`` when it is free, else a free port."""
    # Ray's job agent always wants 52365; another Ray on this machine (a test suite's ray.init()) may hold it,
    # and jobs then fail with "No available agent to submit job".
    return wanted if port_free(wanted) else free_port()


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
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


def dashboard_state(cluster: LocalCluster, timeout: float = 2.0) -> Literal["ok", "refused", "down"]:
    """Whether the dashboard answers with this machine's token ("ok"), refuses the token, or does not answer."""
    status, _ = get_json(f"{cluster.dashboard_url}/api/version", timeout)
    if status == 200:
        return "ok"
    return "refused" if status in (401, 403) else "down"


def cluster_alive(cluster: LocalCluster | None = None, timeout: float = 2.0) -> bool:
    """Whether a Ray dashboard (and so a head node) answers on ``cluster``'s dashboard port.

    Raises:
        ValueError: ``cluster`` is None and a ``CHATRAY_*`` port variable is not a port number.
    """
    return dashboard_state(cluster or LocalCluster.from_env(), timeout) != "down"


def alive_nodes(cluster: LocalCluster) -> int | None:
    """Alive nodes as Ray's state API lists them; None when it does not answer."""
    status, body = get_json(f"{cluster.dashboard_url}/api/v0/nodes?limit=10000", timeout=10)
    try:
        nodes = body["data"]["result"]["result"]
    except (TypeError, KeyError):
        return None
    return sum(1 for n in nodes if n.get("state") == "ALIVE") if status == 200 else None


def serve_running(cluster: LocalCluster) -> bool:
    """Whether Serve's controller runs on ``cluster``; True when the Serve REST API does not say."""
    status, body = get_json(f"{cluster.dashboard_url}/api/serve/applications/", timeout=10)
    if status != 200 or not isinstance(body, dict):
        return True  # unknown: let `serve shutdown` find out
    return bool((body.get("controller_info") or {}).get("node_id"))
