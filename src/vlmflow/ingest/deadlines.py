"""A deadline for each download attempt, whatever the server does.

requests' ``timeout`` bounds each socket operation: a server that sends one byte a second
never trips it, and holds a download slot for as long as it likes. Here every attempt
gets a deadline; when it passes, a timer shuts the attempt's sockets down, which wakes
the blocked read at once (headers or body, plain or TLS), and the attempt then reports
itself expired.

The sockets are found through the connection classes of :class:`DeadlineAdapter`: a
connection registers its socket with the attempt running in its thread when it connects
and when a request is sent over a kept-alive one. The timer is stopped before a
connection goes back to the pool, so a deadline never reaches another attempt's socket.
Not covered: the DNS lookup (``getaddrinfo`` cannot be interrupted from Python).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_LOCAL = threading.local()


class Attempt:
    """One attempt's deadline: :meth:`watch` its sockets; they are shut down when it passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self.expired:  # connected after the deadline: no use going on
                _shut(sock)
            elif not any(known is sock for known in self._sockets):
                self._sockets.append(sock)

    def stop(self) -> None:
        """No shutdown after this returns (call before the connection goes back to the pool)."""
        with self._lock:
            self._stopped = True
            self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def attempt_within(seconds: float) -> Iterator[Attempt]:
    """Run one attempt (in this thread) under a deadline ``seconds`` from now."""
    current = Attempt(seconds)
    _LOCAL.attempt = current
    current.start()
    try:
        yield current
    finally:
        current.stop()
        _LOCAL.attempt = None


def _register(sock: socket.socket | None) -> None:
    current: Attempt | None = getattr(_LOCAL, "attempt", None)
    if current is not None:
        current.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _register(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self.sock)  # a kept-alive connection: already connected
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _register(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose connections register their sockets with the running attempt."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.ProxyManager:
        manager: urllib3.ProxyManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager
