"""A TCP proxy on 127.0.0.1 in front of the moto S3 server that can take "storage" away and give it back.

Clients (Ray Train workers, chatray) talk to the proxy's port as their S3 endpoint. :meth:`FlakyProxy.trip_on`
arms it: the first request whose bytes contain a pattern (e.g. a checkpoint's folder name in the object key of an
upload) cuts every open connection and closes the listening socket for ``down_s`` seconds (connections are refused,
as from a storage server that went away), then the proxy listens again on the same port. moto keeps its data, so
what was written before the outage is still there after it.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["FlakyProxy"]


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._pattern: bytes | None = None
        self._down_s = 0.0
        self.tripped = threading.Event()  # set when the outage starts
        self.restored = threading.Event()  # set when the proxy listens again after it
        self._closed = False
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trip_on(self, pattern: bytes, down_s: float) -> None:
        """Start an outage of ``down_s`` seconds at the first request that contains ``pattern``."""
        self._pattern, self._down_s = pattern, down_s
        self.tripped.clear()
        self.restored.clear()

    def close(self) -> None:
        self._closed = True
        self._cut()

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: an outage, or the end
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self._pattern is not None and self._pattern in data:
                    self._pattern = None
                    threading.Thread(target=self._outage, daemon=True).start()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _cut(self) -> None:
        """Close the listener and every open connection."""
        with self._lock:
            conns, self._conns = self._conns, []
        try:
            self._listener.close()
        except OSError:
            pass
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _outage(self) -> None:
        self._cut()
        self.tripped.set()
        time.sleep(self._down_s)
        if self._closed:
            return
        self._listener = self._listen(self.port)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        self.restored.set()
