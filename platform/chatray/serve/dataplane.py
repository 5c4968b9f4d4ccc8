"""The Ray Serve data plane chatray runs on: environment settings for the Ray clusters it starts.

Ray Serve reads these variables once, when each of its processes starts, so they must be in the environment
of whatever starts Ray (``ray start``, or a driver whose ``ray.init()`` starts a local Ray); the Serve
controller, proxy and replicas inherit them from there. chatray applies them where it starts Ray itself:
``chatray serve`` without a cluster, ``chatray cluster start`` (so ``make demo``), the test suite and
``benchmarks/bench_serve.py``. The cluster definitions under ``cluster/`` export them before ``ray start``;
for a cluster you start yourself, export them first (see the README).

A value already in the environment always wins: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` gives Ray's stock data
plane back. The variables change only how requests travel between Serve's processes, not what any endpoint
answers: the serving tests pass in both modes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

__all__ = ["SERVE_ENV", "apply_serve_env", "serve_env"]

SERVE_ENV: dict[str, str] = {
    # Ray >= 2.55 (documented in Ray's "Enable High Throughput on Ray Serve" guide): proxy -> replica and
    # replica -> replica calls go over direct gRPC instead of Ray actor calls, and user code runs on the
    # replica's own event loop. On 2 CPU cores this took a tiny model's HTTP request from 1.20x to about 1.15x
    # of the in-process call (benchmarks/bench_serve.py, README).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but keep Serve's HTTP proxy: that mode otherwise drops the proxy and makes every ingress replica
    # listen on a port of its own (30000 and up), so http_options.port would not be one endpoint any more and
    # a redeploy would move it.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # ... and keep deployment handles usable from synchronous code (scripts, `.result()`), as in stock Ray.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    # ... and keep the replicas' log lines on stderr (the console of `chatray serve`, the worker logs).
    "RAY_SERVE_LOG_TO_STDERR": "1",
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
