"""The Ray Serve data plane chatray runs on: environment settings for the Ray clusters it starts.

Ray Serve reads these variables once, when each of its processes starts, so they must be in the environment
of whatever starts Ray (``ray start``, or a driver whose ``ray.init()`` starts a local Ray); the Serve
controller, proxy and replicas inherit them from there. chatray applies them where it starts Ray itself:
``chatray serve`` without a cluster, ``chatray up`` / ``cluster/local/start.sh`` / ``make demo``, the test
suite and ``benchmarks/bench_serve.py``. The cluster definitions under ``cluster/`` export them before ``ray start``;
for a cluster you start yourself, export them first (see the README).

A value already in the environment always wins: ``RAY_SERVE_USE_GRPC_BY_DEFAULT=0`` gives Ray's stock data
plane back. The variable changes how requests travel between Serve's processes; what the endpoints answer is
the same (the serving tests were run in both modes). Two things differ on the gRPC path: its messages are capped
at 4 MiB (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``; ``max_body_bytes`` is capped at 2 MiB for that reason),
and across nodes the proxy and replicas connect to each other's gRPC ports (any port; the shipped cluster
definitions allow all traffic between their nodes).

``RAY_SERVE_USE_GRPC_BY_DEFAULT`` is an internal Ray Serve setting (``ray.serve._private.constants``), the one
that Ray's documented ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode turns on; a test checks that the installed Ray
still reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

__all__ = ["SERVE_ENV", "apply_serve_env", "serve_env"]

SERVE_ENV: dict[str, str] = {
    # Calls between Serve's processes (proxy -> Ingress replica -> Generator replica) go over direct gRPC
    # instead of Ray actor calls: the data plane of Ray's throughput-optimized mode (Ray >= 2.55), without
    # the rest of that mode, which drops Serve's HTTP proxy (each ingress replica would listen on a port of
    # its own, so http_options.port would not be one endpoint any more). It makes the two hops of a request
    # 2-3 ms faster on 2 CPU cores (README, "Serve's data plane").
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def serve_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus each :data:`SERVE_ENV` setting that it does not set itself."""
    return {**SERVE_ENV, **env}


def apply_serve_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add the :data:`SERVE_ENV` settings that ``environ`` (default: this process's) does not set itself.

    Call it before ``ray.init()`` starts a local Ray; it changes nothing in a Ray that is already running.
    """
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
