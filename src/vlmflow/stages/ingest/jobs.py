"""One job per input row: its key, URL, caption and extra fields, and the failures
decided before any download (a record that is no row, missing URL or key, duplicate in
the shard, a local file the list may not name)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from vlmflow.stages.ingest.lists import BadRow, Row, resolve_url, sanitize_key
from vlmflow.stages.ingest.settings import RESERVED_FIELDS, Failure, IngestSettings


@dataclass(frozen=True)
class Job:
    row: int  # absolute row index in the URL list
    key: str | None
    url: str  # resolved URL ("" when the cell is empty)
    caption: str
    extra: dict[str, Any]
    failure: Failure | None = None  # decided before downloading (missing_url, duplicate)
    data: bytes | None = None  # the image itself, for sources that carry it (no download)


def _row_key(row: dict[str, Any], url: str, settings: IngestSettings) -> str | None:
    """The row's key: its key column's (None when that cell is empty), or the URL's hash."""
    if settings.key_column is None:
        return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]
    raw = row[settings.key_column]
    if raw is None or not raw.strip():
        return None
    return sanitize_key(raw.strip())


def _extra_columns(row: dict[str, Any], settings: IngestSettings) -> dict[str, Any]:
    extra = {}
    for name, value in row.items():
        if name in (settings.url_column, settings.caption_column):
            continue
        if name == settings.key_column and name == "key":
            continue  # already stored (sanitised) as "key"
        extra[f"src_{name}" if name in RESERVED_FIELDS else name] = value
    return extra


def plan_jobs(
    path: Path,
    rows: list[Row],
    start: int,
    settings: IngestSettings,
    image_root: str | Path | None = None,
) -> list[Job]:
    """One job per row; bad records, empty cells and duplicates are decided here, not
    downloaded."""
    jobs: list[Job] = []
    seen_keys: dict[str, int] = {}
    seen_urls: dict[str, int] = {}
    for offset, row in enumerate(rows):
        index = start + offset
        if isinstance(row, BadRow):
            bad = Failure("malformed_row", f"{path}: data row {index}: {row.reason}")
            jobs.append(Job(index, None, "", "", {}, bad))
            continue
        cell = (row[settings.url_column] or "").strip()
        caption = row[settings.caption_column] or ""
        extra = _extra_columns(row, settings)
        # Keys hash the URL as written, so moving the list folder keeps keys stable.
        key = _row_key(row, cell, settings) if cell or settings.key_column else None
        failure = _missing_cell(cell, key, settings)
        if failure is not None:
            jobs.append(Job(index, key, "", caption, extra, failure))
            continue
        assert key is not None
        url = resolve_url(cell, path, image_root)
        failure = _duplicate_of(key, url, seen_keys, seen_urls)
        if failure is None:
            seen_keys[key] = seen_urls[url] = index
            failure = _local_file_refused(cell, url, path, image_root, settings)
        jobs.append(Job(index, key, url, caption, extra, failure))
    return jobs


def _missing_cell(cell: str, key: str | None, settings: IngestSettings) -> Failure | None:
    """``missing_url`` or ``missing_key`` for a row without one, else None."""
    if not cell:
        return Failure("missing_url", f"column {settings.url_column!r} is empty")
    if key is None:
        return Failure(
            "missing_key",
            f"key column {settings.key_column!r} is empty; every row needs a key (or leave "
            "key_column unset to hash the URL)",
        )
    return None


def _local_file_refused(
    cell: str, url: str, path: Path, image_root: str | Path | None, settings: IngestSettings
) -> Failure | None:
    """``blocked`` for a local file the list may not name, else None.

    A URL list from the web must not pull the machine's own files into a dataset: a
    ``file:`` URL or plain path is read only when it stays inside the list's folder (a
    relative ``file:`` URL) or the dataset's ``image_root`` (a plain path), or when the
    config says the list is the user's own (``ingest.allow_local_files``). "Inside" is
    decided on the path as written, so symlinks in the user's own folders still work.
    """
    try:
        parts = urlsplit(cell)
    except ValueError:
        return None  # malformed: "invalid_url" at download time
    scheme = parts.scheme.lower()
    if scheme not in ("file", "") or settings.allow_local_files:
        return None
    if not scheme:  # a plain path: under image_root; without one, "invalid_url" later
        if image_root is None or _stays_inside(cell):
            return None
    elif not cell.lower().startswith("file:/") and _stays_inside(unquote(parts.path)):
        return None
    return Failure(
        "blocked",
        f"local file {url} named by {path}: only file:relative/paths under the list's "
        "folder (or paths under image_root) are read; set ingest.allow_local_files: true "
        "for a list you wrote yourself",
    )


def _stays_inside(relative: str) -> bool:
    """Whether a relative path as written stays inside its base folder (no ``..`` out)."""
    normal = os.path.normpath(relative)
    return not os.path.isabs(normal) and normal != ".." and not normal.startswith("../")


def _duplicate_of(
    key: str, url: str, seen_keys: dict[str, int], seen_urls: dict[str, int]
) -> Failure | None:
    if key in seen_keys:
        return Failure("duplicate", f"same key as row {seen_keys[key]}")
    if url in seen_urls:
        return Failure("duplicate", f"same url as row {seen_urls[url]}")
    return None
