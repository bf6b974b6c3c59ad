"""What every source is: the Source base class (shards by id, digests that cover only a
shard's own rows, jobs), the source kinds and the helpers the kinds share."""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from vlmflow.stages.ingest.jobs import Job
from vlmflow.stages.ingest.lists import (
    shard_ranges,
)
from vlmflow.stages.ingest.parts import (
    split_shard_id,
)
from vlmflow.stages.ingest.settings import RESERVED_FIELDS, Failure, IngestError, IngestSettings

SOURCE_KINDS = ("url_list", "image_folder", "coco", "hf_dataset", "webdataset")


def short_digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_state(path: Path) -> list[int] | None:
    """Size and mtime: a cheap stand-in for a file's content in shard digests."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def extras(fields: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    """Source fields kept in {key}.json; names this stage writes itself get a prefix."""
    return {
        (f"src_{name}" if name in RESERVED_FIELDS else name): value
        for name, value in fields.items()
        if name not in skip
    }


class Source(ABC):
    """A dataset's rows in a fixed order; see the module docstring."""

    kind: str

    @abstractmethod
    def count(self) -> int:
        """Number of rows."""

    def shard_ranges(self, shard_size: int) -> list[tuple[int, int]]:
        return shard_ranges(self.count(), shard_size)

    @abstractmethod
    def digest(self, start: int, end: int) -> str:
        """Changes when rows [start, end) change; independent of other rows."""

    @abstractmethod
    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        """One ingest job per row in [start, end), in row order."""

    @abstractmethod
    def inputs(self) -> list[str]:
        """The files/folders the source reads (Snakemake inputs of the ingest rule)."""

    def describe(self) -> str:
        return f"{self.kind}:{self.inputs()[0]}"

    # Shards by id: NNNNNN, shard n being rows [n * shard_size, ...) (a source in parts
    # overrides these).

    def shard_ids(self, shard_size: int) -> list[str]:
        return [f"{number:06d}" for number in range(len(self._ranges(shard_size)))]

    def _ranges(self, shard_size: int) -> list[tuple[int, int]]:
        memo = self._shard_ranges_by_size
        if shard_size not in memo:
            memo[shard_size] = self.shard_ranges(shard_size)
        return memo[shard_size]

    @functools.cached_property
    def _shard_ranges_by_size(self) -> dict[int, list[tuple[int, int]]]:
        return {}

    def shard_rows(self, shard: str, shard_size: int) -> dict[str, Any]:
        """A shard's params: its row range and the digest of its rows."""
        ranges = self._ranges(shard_size)
        tag, number = split_shard_id(shard)
        if tag is not None or number >= len(ranges):
            raise IngestError(f"{self.describe()}: no shard {shard} ({len(ranges)} shards)")
        start, end = ranges[number]
        return {"start": start, "end": end, "digest": self.digest(start, end)}

    def shard_inputs(self, shard: str) -> list[str]:
        """The files a shard reads (the ingest rule's inputs)."""
        return self.inputs()

    def shard_jobs(
        self, shard: str, rows: dict[str, Any], settings: IngestSettings
    ) -> tuple[str, list[Job]]:
        """(where the rows come from, their jobs) of ``shard``, planned with ``rows``."""
        return self.describe(), self.jobs(rows["start"], rows["end"], settings)

    def removed_parts(self) -> list[str]:
        """Parts of the source that earlier plans had and it no longer has."""
        return []


def check_range(name: str, start: int, end: int, n_rows: int) -> None:
    if not 0 <= start <= end <= n_rows:
        raise IngestError(
            f"{name}: rows [{start}, {end}) requested but it has {n_rows} "
            "(did the source shrink since shards were planned?)"
        )


def dedupe(jobs: list[Job]) -> list[Job]:
    """Mark later rows with an already seen key as duplicates (counted, not ingested)."""
    seen: dict[str, int] = {}
    marked = []
    for job in jobs:
        key = job.key
        if job.failure is None and key is not None:
            if key in seen:
                failure = Failure("duplicate", f"same key as row {seen[key]}")
                job = Job(job.row, key, job.url, job.caption, job.extra, failure)
            else:
                seen[key] = job.row
        marked.append(job)
    return marked


# --------------------------------------------------------------------------- URL list
