"""Run a shard's jobs (downloads in a thread pool, results in row order) into a
WebDataset tar and the stats json that accounts for every row; summarise stats files."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import tarfile
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from vlmflow.core.io import atomic_open, image_digest, write_json
from vlmflow.core.logs import progress_bar
from vlmflow.stages.ingest.fetch import fetch, make_session
from vlmflow.stages.ingest.images import StoredImage, process_image
from vlmflow.stages.ingest.jobs import Job
from vlmflow.stages.ingest.settings import Failure, IngestSettings


def _run_job(
    job: Job, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> StoredImage | Failure:
    """Download and re-encode one image; expected per-row problems come back as Failure."""
    if job.failure is not None:
        return job.failure
    try:
        data = job.data
        if data is None:
            data = fetch(job.url, settings, session, shard_deadline)
        elif len(data) > settings.max_bytes:
            raise Failure("too_large", f"{len(data)} bytes > max_bytes {settings.max_bytes}")
        return process_image(data, settings)
    except Failure as failure:
        return failure


def _results_in_order(
    jobs: list[Job], settings: IngestSettings
) -> Generator[tuple[Job, StoredImage | Failure], None, None]:
    """Yield (job, result) in row order while at most a bounded window is in flight.

    The window keeps memory bounded (only finished-but-not-yet-written images are held)
    and the output order independent of which download finishes first.
    """
    window = max(1, settings.threads) * 4
    budget = settings.shard_budget_s
    shard_deadline = None if budget is None else time.monotonic() + budget
    session = make_session(settings)
    pool = ThreadPoolExecutor(max_workers=max(1, settings.threads), thread_name_prefix="ingest")
    pending: deque[tuple[Job, Future[StoredImage | Failure]]] = deque()
    todo = iter(jobs)
    try:
        while True:
            for job in itertools.islice(todo, window - len(pending)):
                pending.append((job, pool.submit(_run_job, job, settings, session, shard_deadline)))
            if not pending:
                return
            job, future = pending.popleft()
            yield job, future.result()
    finally:
        # On an error (or an abandoned generator) do not keep downloading the rest.
        pool.shutdown(wait=True, cancel_futures=True)
        session.close()


def write_tar_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> None:
    """Add one sample as WebDataset lays it out: ``{key}.{ext}`` members, in ext order.

    Written with the standard library rather than webdataset's TarWriter: importing
    webdataset imports torch, about 2 s added to every ingest job (see
    benchmarks/ingest.py); the shards are read back with webdataset everywhere else.
    mtime 0 keeps the tar byte-identical between runs.
    """
    key = sample["__key__"]
    for ext in sorted(name for name in sample if name != "__key__"):
        data = sample[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        tar.addfile(info, io.BytesIO(data))


def _sample(job: Job, image: StoredImage) -> dict[str, Any]:
    assert job.key is not None
    meta = {
        **job.extra,
        "key": job.key,
        "url": job.url,
        "caption": job.caption,
        "row": job.row,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
    }
    return {
        "__key__": job.key,
        image.ext: image.data,
        "txt": job.caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def write_shard(
    jobs: list[Job],
    source: str,
    start: int,
    end: int,
    settings: IngestSettings,
    out_tar: str | Path,
    out_stats: str | Path,
    shard_id: str,
) -> dict[str, Any]:
    """Run the jobs (one per input row) into a WebDataset tar; write and return the stats."""
    ok = 0
    failed: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    images: list[list[str]] = []  # [key, url, digest of the stored image] per sample
    with atomic_open(out_tar, "wb") as handle:
        with (
            tarfile.open(fileobj=handle, mode="w|") as sink,
            # closing(): if writing fails, stop the downloads now rather than at GC.
            contextlib.closing(_results_in_order(jobs, settings)) as results,
        ):
            for job, result in progress_bar(
                results, desc=f"ingest {shard_id}", unit="row", total=len(jobs)
            ):
                if isinstance(result, Failure):
                    failed[result.reason] = failed.get(result.reason, 0) + 1
                    failures.append(
                        {
                            "row": job.row,
                            "key": job.key,
                            "url": job.url,
                            "reason": result.reason,
                            "detail": result.detail,
                        }
                    )
                else:
                    write_tar_sample(sink, _sample(job, result))
                    images.append([str(job.key), job.url, image_digest(result.data)])
                    ok += 1
        # Every input row must end as a sample or a counted failure, never silently lost.
        rows_in = end - start
        if not rows_in == len(jobs) == ok + sum(failed.values()):
            raise RuntimeError(
                f"{shard_id}: {rows_in} rows in, {len(jobs)} planned, but {ok} ok + "
                f"{sum(failed.values())} failed"
            )
    stats = {
        "shard": shard_id,
        "source": source,
        "row_start": start,
        "row_end": end,
        "rows_in": rows_in,
        "ok": ok,
        "failed": dict(sorted(failed.items())),
        "failures": failures,
        "images": images,
    }
    write_json(out_stats, stats)
    return stats
