"""A deadline for each download attempt, whatever the server does.

requests' ``timeout`` bounds each socket operation: a server that sends one byte a second
never trips it, and holds a download slot for as long as it likes. Here every attempt
gets a deadline; when it passes, a watchdog shuts the attempt's sockets down, which wakes
the blocked read at once (headers or body, plain or TLS), and the attempt then reports
itself expired. One watchdog thread per process serves every attempt (a timer thread per
attempt cost a thread start per download).

The sockets are found through the connection classes of :class:`DeadlineAdapter`: a
connection registers its socket with the attempt running in its thread when it connects
and when a request is sent over a kept-alive one. An attempt is stopped before a
connection goes back to the pool, so a deadline never reaches another attempt's socket.
Not covered: the DNS lookup (``getaddrinfo`` cannot be interrupted from Python).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
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

    def start(self) -> None:
        _WATCHDOG.add(self, time.monotonic() + max(0.0, self.seconds))

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
            self._sockets.clear()

    def expire(self) -> None:
        """The deadline has passed: shut the sockets down, unless the attempt has stopped."""
        with self._lock:
            if self._stopped:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


class _Watchdog:
    """Expires attempts when their deadlines pass: one thread, a heap of deadlines.

    Stopped attempts stay in the heap until their deadline and are then skipped, so the
    heap holds at most the attempts started within the longest deadline.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Attempt]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, attempt: Attempt, deadline: float) -> None:
        with self._wake:
            heapq.heappush(self._heap, (deadline, next(self._order), attempt))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="vlmflow-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is attempt:  # earlier than what the thread waits for
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                due = self._next_due()
            due.expire()

    def _next_due(self) -> Attempt:
        """Wait (holding the condition) until the earliest deadline passes; pop it."""
        while True:
            if not self._heap:
                self._wake.wait()
                continue
            wait = self._heap[0][0] - time.monotonic()
            if wait <= 0:
                return heapq.heappop(self._heap)[2]
            self._wake.wait(wait)


_WATCHDOG = _Watchdog()


def _after_fork() -> None:
    # A forked child has none of the parent's threads, and the condition may have been
    # held by one of them at the fork: start from a fresh watchdog.
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_after_fork)


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
