"""What a set of processes listens on, and which of those listeners are reachable from other machines.

Used by the loopback tests (a local Ray must expose nothing): every TCP socket in LISTEN state and every UDP
socket bound without a peer, of the given processes, read with psutil.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["RAY_260_WILDCARD_EXCEPTION", "Listener", "exposed_listeners", "is_loopback_ip", "listeners", "report"]

# The one listener Ray 2.60 opens on all interfaces whatever the node's address: the gRPC server each Serve replica
# starts for calls from other deployments (ray/serve/_private/replica.py binds it to "[::]:0", hard-coded; Ray's
# token auth interceptor guards it). At most one per replica process is tolerated, nothing else.
RAY_260_WILDCARD_EXCEPTION = "ray::ServeReplica:"


@dataclass(frozen=True)
class Listener:
    """One listening socket of one process."""

    name: str
    pid: int
    kind: str  # "tcp" or "udp"
    ip: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.name} (pid {self.pid}) {self.kind} {host}:{self.port}"


def is_loopback_ip(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4 loopback seen through an IPv6 socket (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listeners(procs: Iterable[Any]) -> list[Listener]:
    """The listening sockets of ``procs`` (``psutil.Process``); processes that have exited are skipped."""
    out: list[Listener] = []
    for p in procs:
        try:
            name = p.name()
            if name in ("python", "python3") or name.startswith("python3."):
                name = " ".join(p.cmdline()[:3])[:120]  # which Python: the dashboard, the autoscaler, a driver
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.type == 1 and c.status == psutil.CONN_LISTEN:  # SOCK_STREAM
                out.append(Listener(name, p.pid, "tcp", c.laddr.ip, c.laddr.port))
            elif c.type == 2 and not c.raddr:  # SOCK_DGRAM bound without a peer: it receives from anyone
                out.append(Listener(name, p.pid, "udp", c.laddr.ip, c.laddr.port))
    return out


def exposed_listeners(found: Iterable[Listener]) -> tuple[list[Listener], list[Listener]]:
    """(exposed, tolerated): listeners on a non-loopback address, less Ray 2.60's known one per Serve replica
    (:data:`RAY_260_WILDCARD_EXCEPTION`), which come back as ``tolerated``."""
    exposed: list[Listener] = []
    tolerated: list[Listener] = []
    for item in sorted(found, key=lambda x: (x.pid, x.port)):
        if is_loopback_ip(item.ip):
            continue
        known = (item.name.startswith(RAY_260_WILDCARD_EXCEPTION) and item.kind == "tcp"
                 and item.ip in ("::", "0.0.0.0") and not any(t.pid == item.pid for t in tolerated))
        (tolerated if known else exposed).append(item)
    return exposed, tolerated


def report(found: Iterable[Listener]) -> str:
    """All listeners, one a line, for a failure message."""
    return "\n".join(f"  {item}" for item in sorted(found, key=lambda x: (x.name, x.pid, x.port)))


def assert_loopback_only(found: list[Listener], serve_replicas: int) -> None:
    """The listeners of a local Ray running a Serve app: a real Ray (GCS, raylet, proxy, ``serve_replicas``
    replicas), and none on a non-loopback address but Ray 2.60's one per replica."""
    names = {item.name for item in found}
    assert {"gcs_server", "raylet"} <= names, f"not the processes of a local Ray:\n{report(found)}"
    replicas = {item.pid for item in found if item.name.startswith("ray::ServeReplica:")}
    assert len(replicas) == serve_replicas and any(n.startswith("ray::ProxyActor") for n in names), report(found)
    exposed, tolerated = exposed_listeners(found)
    assert not exposed, ("listening on a non-loopback address:\n" + report(exposed)
                         + "\n\nall listeners:\n" + report(found))
    assert {t.pid for t in tolerated} <= replicas  # Ray 2.60's replica gRPC server, one per replica at most
