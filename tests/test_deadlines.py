"""Per-attempt download deadlines (vlmflow.stages.ingest.deadlines): one watchdog per process."""

from __future__ import annotations

import socket
import threading
import time

from vlmflow.stages.ingest.deadlines import attempt_within


def blocked_read(sock: socket.socket) -> float:
    """Seconds a read on ``sock`` blocks before it returns (shut down: at once)."""
    start = time.monotonic()
    sock.settimeout(10)
    sock.recv(1)
    return time.monotonic() - start


def test_an_earlier_deadline_started_after_a_later_one_fires_first() -> None:
    late_a, late_b = socket.socketpair()
    early_a, early_b = socket.socketpair()
    with attempt_within(5) as late:
        late.watch(late_a)
        with attempt_within(0.2) as early:
            early.watch(early_a)
            waited = blocked_read(early_a)
        assert early.expired and 0.15 < waited < 2
        assert not late.expired
    for sock in (late_a, late_b, early_a, early_b):
        sock.close()


def test_a_stopped_attempt_is_never_expired() -> None:
    a, b = socket.socketpair()
    with attempt_within(0.1) as attempt:
        attempt.watch(a)
    time.sleep(0.3)
    assert not attempt.expired
    b.sendall(b"x")
    assert a.recv(1) == b"x"  # the socket (back in a pool, say) still works
    a.close()
    b.close()


def test_attempts_share_one_watchdog_thread(monkeypatch) -> None:
    with attempt_within(1):  # the watchdog is running from here on
        pass
    started = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    for _ in range(200):
        with attempt_within(1):
            pass
    assert started == []
