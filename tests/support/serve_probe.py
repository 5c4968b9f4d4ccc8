"""A driver for the loopback tests: ``python -m support.serve_probe PORT``.

Connects the way chatray's commands do (:func:`chatray.rayenv.connect`: ``RAY_ADDRESS``, else a new local Ray),
deploys a two-deployment Serve app (proxy -> ``Outer`` replica -> ``Inner`` replica, the shape of chatray's
ingress -> generator) on 127.0.0.1:PORT, checks one request through it, prints ``READY <pid>`` and keeps
everything running until its stdin closes; then shuts Serve (and a Ray it started) down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ray import serve

from chatray.rayenv import connect

__all__ = ["probe_running"]

_TESTS = Path(__file__).resolve().parents[1]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Inner:
    def __call__(self, value: int) -> int:
        return value + 1


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Outer:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, request) -> str:
        return str(await self.inner.remote(41))  # a call between replicas: Serve's gRPC data plane


@contextmanager
def probe_running(env: Mapping[str, str], port: int, timeout: float = 300) -> Iterator[subprocess.Popen]:
    """Run this module as a driver with ``env`` until the ``with`` block ends; yields it once its app answers.

    Raises:
        AssertionError: the driver exited or did not get ready in ``timeout`` seconds (with its output).
    """
    env = {**env, "PYTHONPATH": os.pathsep.join([str(_TESTS), str(_TESTS.parent / "platform"),
                                                  env.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "support.serve_probe", str(port)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("READY "):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Serve probe driver {'exited' if proc.poll() is not None else 'hung'}:\n"
                                     + "".join(lines)[-4000:])
        yield proc
    finally:
        try:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)


def main(port: int) -> None:
    import ray

    started = connect(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Outer.bind(Inner.bind()), name="loopback-probe", route_prefix="/")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
        assert r.read() == b"42", "the probe app did not answer"
    print(f"READY {os.getpid()}", flush=True)
    sys.stdin.read()  # until the test closes it
    serve.shutdown()
    if started:
        ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
