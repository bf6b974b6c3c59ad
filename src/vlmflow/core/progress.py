"""Resumable batch loops for the GPU stages (caption, attribute phases).

A shard job on a cluster may be stopped at any time: Slurm's SIGTERM before the time
limit, ``scancel``, preemption, or SIGKILL. The loop here keeps what is done in a side
file beside the output (``OUTPUT.progress.jsonl``, not a declared output, so Snakemake
neither waits for it nor deletes it when the job fails):

* every ``flush_every`` batches the finished rows are appended and fsync'ed; SIGTERM
  flushes at once and exits non-zero, so Snakemake reruns the job, which skips the keys
  already done (at most the interrupted batch is computed again; after a SIGKILL, at most
  the batches since the last flush);
* the file starts with a fingerprint of the settings and the input; a rerun with other
  settings or another input starts over instead of mixing results;
* batches are fixed from the full key list and each is seeded from its first key, so a
  resumed run gives the same rows as an uninterrupted one;
* a batch that raises (e.g. CUDA out of memory) is split in halves and retried, down to
  single samples; a single sample that still fails becomes a counted failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from vlmflow.core.io import atomic_open, stable_seed
from vlmflow.core.logs import progress_bar

log = logging.getLogger(__name__)

# Errors a batch may raise that say nothing about the other batches: out of memory
# (torch.OutOfMemoryError is a RuntimeError), an image the processor cannot take.
BATCH_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError)


class Interrupted(Exception):
    """SIGTERM arrived: progress has been flushed; the job should exit non-zero."""


def progress_path(output: str | Path) -> Path:
    return Path(f"{output}.progress.jsonl")


def fingerprint(*parts: Any) -> str:
    """What the rows in a progress file depend on, as one string."""
    return json.dumps(parts, sort_keys=True, default=str)


def input_state(path: str | Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


class ProgressFile:
    """Finished rows of one shard, appended as JSON lines after a fingerprint line."""

    def __init__(
        self, path: str | Path, fingerprint: str, flush_every: int = 4, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        # Read-only: resume from the file but never write it (the other ranks of a
        # model-parallel job, which compute the same rows as rank 0).
        self.read_only = read_only
        self.fingerprint = fingerprint
        self.flush_every = max(1, flush_every)
        self._matched = False  # the file on disk is ours to append to
        self._pending: list[dict[str, Any]] = []  # rows not yet on disk
        self.done: dict[str, dict[str, Any]] = self._load()
        self.resumed = len(self.done)
        self._batches_since_flush = 0

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        rows: dict[str, dict[str, Any]] = {}
        with open(self.path, encoding="utf-8") as handle:
            header = handle.readline()
            try:
                same = json.loads(header).get("fingerprint") == self.fingerprint
            except (json.JSONDecodeError, AttributeError):
                same = False
            if not same:
                log.info("%s: other settings or input; starting over", self.path)
                return {}
            self._matched = True
            for line in handle:
                try:
                    row = json.loads(line)
                    rows[row["key"]] = row
                except (json.JSONDecodeError, TypeError, KeyError):
                    # A line a SIGKILL cut short: rewritten without it at the next flush.
                    self._matched = False
        if not self._matched:
            self._pending = list(rows.values())
        log.info("%s: resuming, %d keys already done", self.path, len(rows))
        return rows

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.done[row["key"]] = row
        self._pending += rows
        self._batches_since_flush += 1
        if self._batches_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.read_only or (not self._pending and self._matched):
            return
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in self._pending]
        if self._matched:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
        else:  # a new file (or one rewritten without a damaged line): atomically
            with atomic_open(self.path) as handle:
                handle.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
                handle.writelines(lines)
        self._matched = True
        self._pending = []
        self._batches_since_flush = 0

    def remove(self) -> None:
        """Called once the shard's output is written: the progress is in it now."""
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Interrupted`` in the main thread for the duration."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_batches(
    keys: Sequence[str],
    batch_size: int,
    run_batch: Callable[[list[int]], list[dict[str, Any]]],
    failed_row: Callable[[int, BaseException], dict[str, Any]],
    progress: ProgressFile,
    seed: Sequence[Any],
    desc: str,
    order: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Rows for every key, computing only the batches not already in ``progress``.

    ``run_batch(indices)`` returns one row (with its "key") per index; ``order`` is the
    order to batch the indices in (e.g. by prompt length). Returns rows keyed by key.
    Raises ``Interrupted`` (after flushing) on SIGTERM.
    """
    order = list(range(len(keys))) if order is None else list(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    todo = [batch for batch in batches if any(keys[i] not in progress.done for i in batch)]
    computed = {"batches": 0, "samples": 0}
    try:
        with sigterm_raises():
            # Model-parallel ranks run the same batches: one progress bar is enough.
            quiet = progress.read_only
            for batch in progress_bar(todo, desc=desc, unit="batch", disable=quiet):
                rows = _run_or_split(batch, keys, run_batch, failed_row, seed)
                progress.add(rows)
                computed["batches"] += 1
                computed["samples"] += len(batch)
    except Interrupted:
        progress.flush()
        log.warning(
            "%s: stopped by SIGTERM after %d of %d batches; progress saved to %s",
            desc,
            computed["batches"],
            len(todo),
            progress.path,
        )
        raise
    progress.flush()
    log.info(
        "%s: %d batches (%d samples) computed, %d keys resumed from %s",
        desc,
        computed["batches"],
        computed["samples"],
        progress.resumed,
        progress.path,
    )
    return {keys[i]: progress.done[keys[i]] for i in order}


def run_stream(
    keys: Sequence[str],
    stream: Callable[[list[int]], Iterator[tuple[int, Any]]],
    make_row: Callable[[int, Any], dict[str, Any]],
    failed_row: Callable[[int, BaseException], dict[str, Any]],
    progress: ProgressFile,
    desc: str,
    order: Sequence[int] | None = None,
    chunk: int = 64,
) -> dict[str, dict[str, Any]]:
    """Rows for every key, computing only the keys not already in ``progress``, from
    ``stream(indices)``, which yields ``(index, answer or the error of that sample)`` in
    the order answers arrive (an engine's window of requests, see
    vlmflow.core.engine.in_window); ``make_row(index, answer)`` makes an answer's row.
    Rows reach the progress file in chunks of ``chunk``; each sample is seeded by its own
    key, so a resumed shard gets the same rows. Raises ``Interrupted`` (after saving what
    arrived) on SIGTERM.
    """
    order = list(range(len(keys))) if order is None else list(order)
    todo = [i for i in order if keys[i] not in progress.done]
    arrived: list[dict[str, Any]] = []
    results = stream(todo)
    try:
        with sigterm_raises():
            bar = progress_bar(results, desc=desc, unit="sample", total=len(todo))
            for index, result in bar:
                if isinstance(result, BaseException):
                    log.warning("sample %s failed: %s", keys[index], result)
                    arrived.append(failed_row(index, result))
                else:
                    arrived.append(make_row(index, result))
                if len(arrived) >= chunk:
                    progress.add(arrived)
                    progress.flush()
                    arrived = []
    except Interrupted:
        progress.add(arrived)
        progress.flush()
        log.warning(
            "%s: stopped by SIGTERM with %d of %d samples done; progress saved to %s",
            desc,
            len(progress.done),
            len(keys),
            progress.path,
        )
        raise
    finally:
        close = getattr(results, "close", None)
        if close is not None:  # a generator left early: its requests not sent are cancelled
            close()
    progress.add(arrived)
    progress.flush()
    log.info(
        "%s: %d samples computed, %d keys resumed from %s",
        desc,
        len(todo),
        progress.resumed,
        progress.path,
    )
    return {keys[i]: progress.done[keys[i]] for i in order}


def _run_or_split(
    batch: list[int],
    keys: Sequence[str],
    run_batch: Callable[[list[int]], list[dict[str, Any]]],
    failed_row: Callable[[int, BaseException], dict[str, Any]],
    seed: Sequence[Any],
) -> list[dict[str, Any]]:
    # Seeded per batch from its first key: resuming does not change what is sampled.
    torch.manual_seed(stable_seed(*seed, keys[batch[0]]))
    try:
        return run_batch(batch)
    except BATCH_ERRORS as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            log.warning("sample %s failed: %s", keys[batch[0]], error)
            return [failed_row(batch[0], error)]
        half = len(batch) // 2
        log.warning(
            "batch of %d starting at %s failed (%s); retrying as %d + %d",
            len(batch),
            keys[batch[0]],
            error,
            half,
            len(batch) - half,
        )
        return [
            *_run_or_split(batch[:half], keys, run_batch, failed_row, seed),
            *_run_or_split(batch[half:], keys, run_batch, failed_row, seed),
        ]
