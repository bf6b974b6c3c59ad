"""The processes of the vLLM backend: a job's engine processes (engine_worker.py under
the engine environment's Python), the pipes that feed them, their answers, a dead
engine's reason and their stop (vlmflow.core.engine starts them and keeps the window)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, NamedTuple

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The engine could not start, or died: the job fails with its last log line (not a
    RuntimeError, so no batch retry takes it for a failure of its samples)."""


# The engine's own Python runs engine_worker.py (which imports only the standard library
# and vLLM); the job talks to it through pipes (see there).
WORKER = Path(__file__).with_name("engine_worker.py")


# A Python exception's line ("RuntimeError: ...", "pydantic ... ValidationError: ..."),
# then other error lines ("Value error, ...", "error: ..."; not "value_error" in a URL).
EXCEPTION_LINE = re.compile(r"[A-Za-z](?:Error|Exception): ")
ERROR_LINE = re.compile(r"\b(?:[Ee]rror|[Ee]xception)\b|[a-z](?:Error|Exception)\b")
# Lines that name an error without being one (warnings about limits).
NOT_ERRORS = re.compile(r" WARNING ")


def last_line(path: Path) -> str:
    """The error a dead engine's log names: its first exception (the root cause; later
    ones say the engine died of it), with pydantic's detail line; else the last error
    line, else the last line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [
        _after_prefix(line.strip())
        for line in lines
        if line.strip() and not NOT_ERRORS.search(line)
    ]
    for number, line in enumerate(lines):
        if EXCEPTION_LINE.search(line):
            detail = lines[number + 1] if number + 1 < len(lines) else ""
            return f"{line} {detail}" if "validation error" in line else line
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return errors[-1] if errors else (lines[-1] if lines else "(empty log)")


def _after_prefix(line: str) -> str:
    """A log line without vLLM's "(Worker pid=N) ERROR date [file:line]" prefix."""
    return re.sub(r"^\(\w+ pid=\d+\)\s+\w+\s+[\d-]+ [\d:]+ \[[^\]]+\]\s*", "", line)


# A worker's end of input: it died (its reader thread's last message).
GONE = None


class Worker:
    """One engine process (engine_worker.py) and the thread that passes its answers on."""

    def __init__(self, process: subprocess.Popen[str], inbox: queue.Queue[Any]) -> None:
        self.process = process
        self.in_flight = 0
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue[Any]) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                inbox.put((self, json.loads(line)))
        finally:
            inbox.put((self, GONE))

    def send(self, message: dict[str, Any]) -> bool:
        """Write one request; False if the engine no longer reads."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        self.in_flight += 1
        return True

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop the engine's whole process group (its engine core and workers too): a
        SIGTERM, then after ``grace_s`` a SIGKILL (the job has every answer by then, and
        vLLM's own orderly shutdown takes seconds), and wait until every process in it
        has exited, so that nothing of it competes with what the job does next."""
        for signal_now, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal_now)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.process.poll()  # the leader reaped: it leaves the group
                if not group_alive(self.process.pid):
                    return
                time.sleep(0.02)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class Answer(NamedTuple):
    """A finished request: its answer's token ids, or the engine's reason to refuse it."""

    ident: int
    result: list[int] | str
    prompt_tokens: int = 0


class Engine:
    """A job's running engines (one, or one per data-parallel group of its GPUs): requests
    go to the one with the fewest in flight, answers come back from all as they finish.
    The engines load while the job prepares its requests: the first request (or
    ``version``) waits until they are ready."""

    def __init__(self, inbox: queue.Queue[Any], log_path: Path, startup_timeout_s: float) -> None:
        self.workers: list[Worker] = []
        self.inbox = inbox
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.started = time.monotonic()
        self.ready_version: str | None = None
        self.requests = itertools.count()

    def dead(self, worker: Worker) -> EngineError:
        code = worker.process.wait()
        return EngineError(
            f"the vLLM engine exited with code {code}: {last_line(self.log_path)} "
            f"(log: {self.log_path})"
        )

    @property
    def version(self) -> str:
        """The engine's vLLM version, once it is ready."""
        if self.ready_version is None:
            self.wait_ready()
        assert self.ready_version is not None
        return self.ready_version

    def wait_ready(self) -> None:
        """Wait until every engine is built (within ``startup_timeout_s`` of its start)."""
        deadline = self.started + self.startup_timeout_s
        waiting = set(self.workers)
        while waiting:
            try:
                worker, message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise EngineError(
                    f"the vLLM engine was not ready within {self.startup_timeout_s:.0f} s: "
                    f"{last_line(self.log_path)} (log: {self.log_path})"
                ) from None
            if message is GONE:
                raise self.dead(worker)
            self.ready_version = str(message["ready"])
            waiting.discard(worker)
        log.info("vLLM %s ready after %.1f s", self.ready_version, time.monotonic() - self.started)

    def submit(self, message: dict[str, Any]) -> int:
        """Send one request (``message`` without its id); its id."""
        if self.ready_version is None:
            self.wait_ready()
        ident = next(self.requests)
        worker = min(self.workers, key=lambda w: w.in_flight)
        if not worker.send(message | {"id": ident}):
            raise self.dead(worker)
        return ident

    def answer(self, timeout_s: float) -> Answer:
        """The next finished request. A dead or silent engine raises EngineError."""
        try:
            worker, message = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineError(
                f"the vLLM engine finished no request in {timeout_s:.0f} s "
                f"(engine.request_timeout_s; log: {self.log_path})"
            ) from None
        if message is GONE:
            raise self.dead(worker)
        worker.in_flight -= 1
        if "error" in message:
            return Answer(int(message["id"]), str(message["error"]))
        ids = [int(i) for i in message["token_ids"]]
        return Answer(int(message["id"]), ids, int(message["prompt_tokens"]))

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def start_worker(
    args: list[str], env: dict[str, str], log_handle: IO[bytes], command: str
) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_handle,
            text=True,
            encoding="utf-8",
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError:
        raise EngineError(
            f"vllm.command {command!r}: {args[0]} not found; build the engine's environment "
            "with `make setup-vllm`, or point vllm.command at your vLLM installation's Python"
        ) from None


def die_with_parent() -> None:
    """In the engine's process: be stopped when the job's process dies, even by SIGKILL
    (Linux; elsewhere the job's own cleanup and Slurm's do it)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass
