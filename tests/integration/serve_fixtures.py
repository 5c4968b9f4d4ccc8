"""Helpers for the serving integration tests: a tiny checkpoint, free ports, HTTP polling, load generators."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from support.checkpoints import make_checkpoint as make_tiny_checkpoint
from support.ports import free_port

__all__ = ["Load", "free_port", "make_tiny_checkpoint", "wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Load:
    """``n`` threads sending ``request()`` in a loop until stopped; counts status codes and exceptions."""

    def __init__(self, request: Callable[[], int], n: int) -> None:
        self._request = request
        self._stop = threading.Event()
        self.codes: Counter = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                code = self._request()
            except Exception as e:  # noqa: BLE001 - a failed request is what we count
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                self.codes[code] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def total(self) -> int:
        return sum(self.codes.values()) + len(self.errors)

    @property
    def failures(self) -> list[str]:
        bad = [f"HTTP {c} x{n}" for c, n in self.codes.items() if c != 200]
        return bad + self.errors
