"""A URL list in parts, and each part's manifest: what planning knows of a part without
reading it.

``url_list`` names one file, a folder (every list file directly in it) or a glob; parts
are taken in sorted name order and each is cut into ``shard_size`` rows on its own, so a
shard never spans two parts. Shard ids:

* a one-file list: ``000000``, ``000001``, ... (rows ``n * shard_size`` on);
* a folder or glob: ``<part tag>_000000``, ... where the tag is the part's file name
  without its list suffix, every character but ``[A-Za-z0-9-]`` as ``-`` (a long name is
  cut and given a hash of itself). Adding, removing or renaming one part therefore never
  renames another part's shards.

A part's manifest (``results/D/parts/<tag>.tsv``; ``_list.tsv`` for a one-file list)
holds its size, mtime, shard size, columns and row count on a JSON first line, then one
fixed-width line per shard: row range, byte offset of its first row (text formats) and
the digest of its rows. The workflow's main process writes it when it is missing or the
part's size, mtime or the shard size changed (one read of the part); planning then reads
manifests only, and a job seeks straight to its own shard's line and its rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.core.io import atomic_open
from vlmflow.stages.ingest.lists import SUPPORTED_SUFFIXES, ShardScan, scan_shards
from vlmflow.stages.ingest.settings import IngestError

# The manifest of a one-file list ("_" cannot start a part tag).
SINGLE = "_list"
MAX_TAG_LEN = 80
# Shard ids of a one-file list, and of a part: what the workflow's wildcard accepts.
SHARD_ID = re.compile(r"(?:(?P<tag>[A-Za-z0-9-]+)_)?(?P<number>\d{6})")
MANIFEST_VERSION = 1
_ENTRY = "{start:012d} {end:012d} {offset:015d} {digest:>16}\n"
_ENTRY_LEN = len(_ENTRY.format(start=0, end=0, offset=0, digest="0" * 16))


@dataclass(frozen=True)
class Part:
    """One file of a URL list: its tag (None for a one-file list) and path."""

    tag: str | None
    path: Path

    @property
    def manifest_name(self) -> str:
        return f"{self.tag or SINGLE}.tsv"

    def shard_id(self, number: int) -> str:
        return f"{self.tag}_{number:06d}" if self.tag else f"{number:06d}"


def is_multipart(url_list: str | Path) -> bool:
    """Whether ``url_list`` names a folder or a glob of parts rather than one file."""
    return Path(url_list).is_dir() or glob.has_magic(str(url_list))


def list_parts(url_list: str | Path) -> list[Part]:
    """The parts of a URL list in sorted name order (see the module docstring)."""
    text = str(url_list)
    if not is_multipart(text):
        return [Part(None, Path(text))]
    if Path(text).is_dir():
        paths = sorted(
            path
            for path in Path(text).iterdir()
            if path.suffix.lower() in SUPPORTED_SUFFIXES and not path.name.startswith(".")
        )
    else:
        paths = sorted(Path(match) for match in glob.glob(text) if Path(match).is_file())
        unsupported = [p.name for p in paths if p.suffix.lower() not in SUPPORTED_SUFFIXES]
        if unsupported:
            raise IngestError(
                f"{text}: matches files that are no URL list ({', '.join(unsupported[:5])}); "
                f"parts must be {', '.join(SUPPORTED_SUFFIXES)}"
            )
    if not paths:
        raise IngestError(
            f"{text}: no URL list parts ({', '.join(SUPPORTED_SUFFIXES)}) "
            + ("in this folder" if Path(text).is_dir() else "match this glob")
        )
    parts = [Part(part_tag(path), path) for path in paths]
    by_tag: dict[str | None, Path] = {}
    for part in parts:
        if part.tag in by_tag:
            raise IngestError(
                f"{text}: parts {by_tag[part.tag].name} and {part.path.name} give the same "
                f"shard tag {part.tag!r}; rename one of them"
            )
        by_tag[part.tag] = part.path
    return parts


def part_tag(path: Path) -> str:
    """A part's tag: its name without the list suffix, as ``[A-Za-z0-9-]``."""
    tag = re.sub(r"[^A-Za-z0-9-]", "-", path.name[: -len(path.suffix)])
    if len(tag) > MAX_TAG_LEN:
        suffix = hashlib.sha1(path.name.encode("utf-8")).hexdigest()[:12]
        tag = f"{tag[: MAX_TAG_LEN - len(suffix) - 1]}-{suffix}"
    return tag


def split_shard_id(shard: str) -> tuple[str | None, int]:
    """(part tag or None, shard number within the part) of a shard id."""
    match = SHARD_ID.fullmatch(shard)
    if match is None:
        raise IngestError(f"{shard!r} is not a shard id (NNNNNN, or TAG_NNNNNN for parts)")
    return match["tag"], int(match["number"])


@dataclass(frozen=True)
class Manifest:
    """A part's manifest: its header (``fields``) and where its shard lines start."""

    path: Path | None
    fields: dict[str, Any]
    entries_at: int
    scans: tuple[ShardScan, ...] | None = None  # when built in memory or read whole

    @property
    def columns(self) -> list[str]:
        return list(self.fields["columns"])

    @property
    def shard_count(self) -> int:
        return int(self.fields["shards"])

    def shard(self, number: int) -> ShardScan:
        """Shard ``number``'s line, read alone from the file when it was not read whole."""
        if not 0 <= number < self.shard_count:
            raise IngestError(
                f"{self.fields['part']}: has {self.shard_count} shards of "
                f"{self.fields['shard_size']} rows, no shard number {number}"
            )
        if self.scans is not None:
            return self.scans[number]
        assert self.path is not None
        with open(self.path, "rb") as handle:
            handle.seek(self.entries_at + number * _ENTRY_LEN)
            return _parse_entry(self.path, handle.read(_ENTRY_LEN).decode("ascii"))

    def shards(self) -> tuple[ShardScan, ...]:
        """Every shard's line: of a manifest just made, or read whole."""
        if self.scans is None:
            raise ValueError(f"{self.path}: read without its shard lines (whole=False)")
        return self.scans

    def is_current(self, part: Path, shard_size: int) -> bool:
        """Whether it describes ``part`` as it is now, cut into ``shard_size`` rows."""
        try:
            stat = part.stat()
        except OSError:
            return False
        return (
            self.fields.get("version") == MANIFEST_VERSION
            and self.fields.get("size") == stat.st_size
            and self.fields.get("mtime_ns") == stat.st_mtime_ns
            and self.fields.get("shard_size") == shard_size
        )


def _parse_entry(path: Path, line: str) -> ShardScan:
    try:
        start, end, offset, digest = line.split()
        return ShardScan(int(start), int(end), int(offset), digest)
    except ValueError:
        raise IngestError(f"{path}: damaged manifest line {line!r}; delete the file") from None


def build_manifest(part: Path, shard_size: int) -> tuple[dict[str, Any], list[ShardScan]]:
    """Read a part once: its manifest header and shards."""
    stat = part.stat()  # before reading: an edit while it is read makes it stale
    columns, scans = scan_shards(part, shard_size)
    fields = {
        "version": MANIFEST_VERSION,
        "part": str(part),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "shard_size": shard_size,
        "columns": columns,
        "rows": scans[-1].end if scans else 0,
        "shards": len(scans),
    }
    return fields, scans


def write_manifest(path: Path, fields: dict[str, Any], scans: list[ShardScan]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps(fields, ensure_ascii=True, sort_keys=True) + "\n")
        for scan in scans:
            handle.write(
                _ENTRY.format(
                    start=scan.start, end=scan.end, offset=scan.offset, digest=scan.digest
                )
            )


def read_manifest(path: Path, whole: bool = False) -> Manifest | None:
    """The manifest at ``path`` (its header only unless ``whole``), or None if absent."""
    try:
        with open(path, "rb") as handle:
            header = handle.readline()
            fields = json.loads(header)
            scans = None
            if whole:
                lines = handle.read().decode("ascii").splitlines(keepends=True)
                scans = tuple(_parse_entry(path, line) for line in lines)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IngestError(f"{path}: not a readable part manifest ({exc}); delete it") from None
    return Manifest(path, fields, len(header), scans)


def manifest_for(
    part: Path, shard_size: int, path: Path | None, build: bool, whole: bool = False
) -> Manifest:
    """``part``'s current manifest: read from ``path``, or (``build``) made and written
    there first when missing or stale; ``path`` None keeps it in memory only."""
    found = read_manifest(path, whole) if path is not None else None
    if found is not None and found.is_current(part, shard_size):
        return found
    if not build:
        state = "missing" if found is None else "stale (the part or shard_size changed)"
        raise IngestError(
            f"{path}: the manifest of {part} is {state}; run snakemake again from the "
            "workflow's folder to plan the list before its jobs run"
        )
    fields, scans = build_manifest(part, shard_size)
    if path is not None:
        write_manifest(path, fields, scans)
    return Manifest(path, fields, 0, tuple(scans))


def build_manifests(
    parts: list[tuple[Path, Path]], shard_size: int, workers: int | None = None
) -> None:
    """Write the manifests of ``parts`` ([(part, manifest path)]), several at a time."""
    if len(parts) < 2 or (workers or os.cpu_count() or 1) < 2:
        for part, path in parts:
            write_manifest(path, *build_manifest(part, shard_size))
        return
    # spawn, not fork: the Snakemake process that calls this runs threads.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    count = min(len(parts), workers or os.cpu_count() or 1)
    with ProcessPoolExecutor(count, mp_context=context) as pool:
        futures = [pool.submit(_build_and_write, part, path, shard_size) for part, path in parts]
        for future in futures:
            future.result()


def _build_and_write(part: Path, path: Path, shard_size: int) -> None:
    write_manifest(path, *build_manifest(part, shard_size))
