"""URL lists (.tsv, .csv, .parquet, .jsonl): rows, shard ranges, row digests, URLs, keys."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import itertools
import json
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from vlmflow.ingest.settings import IngestError, IngestSettings

SUPPORTED_SUFFIXES = (".tsv", ".csv", ".parquet", ".jsonl")


MAX_KEY_LEN = 128


def _check_list(url_list: str | Path) -> Path:
    path = Path(url_list)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise IngestError(
            f"{path}: unsupported URL list type {path.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise IngestError(f"{path}: URL list not found")
    return path


def cell(value: Any) -> str | None:
    """Normalise a cell so CSV, TSV and parquet lists give identical rows (and digests)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (dict, list)):  # nested JSON stays JSON, not a Python repr
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = str(value)
    return text if text != "" else None


def _csv_records(path: Path) -> Generator[list[str], None, None]:
    """Yield records (header first); errors name the file and the 0-based data row."""
    dialect: dict[str, Any] = {"delimiter": ","}
    if path.suffix.lower() == ".tsv":
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    data_rows = 0  # records yielded after the header, for error messages
    try:
        # utf-8-sig: spreadsheet exports often start with a BOM that would rename column 1.
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, **dialect)
            header = next(reader, None)
            if header is None:
                return
            yield header
            for record in reader:
                yield record
                data_rows += 1
    except UnicodeDecodeError as exc:
        raise IngestError(
            f"{path}: not valid UTF-8 near data row {data_rows}: {exc.reason}"
        ) from None
    except csv.Error as exc:
        raise IngestError(f"{path}: data row {data_rows}: malformed record: {exc}") from None


def _csv_header(path: Path, records: Iterator[list[str]]) -> list[str]:
    header = next(records, None)
    if header is None:
        raise IngestError(f"{path}: empty file, expected a header row with column names")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise IngestError(f"{path}: duplicate column names in header: {duplicates}")
    return header


def _read_slice(path: Path, start: int, end: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows [start, end) of a checked URL list, cells normalised by cell."""
    if start < 0 or end < start:
        raise IngestError(f"{path}: invalid row range [{start}, {end})")
    if path.suffix.lower() == ".parquet":
        columns, rows = _parquet_slice(path, start, end)
    elif path.suffix.lower() == ".jsonl":
        with contextlib.closing(_jsonl_records(path)) as records:
            first = next(records, None)
            columns = list(first) if first is not None else []
            rows = [
                _jsonl_row(columns, record)
                for record in itertools.islice(
                    itertools.chain([first] if first is not None else [], records), start, end
                )
            ]
    else:
        # closing(): islice stops early, so close the generator (and its file) now, not at GC.
        with contextlib.closing(_csv_records(path)) as records:
            columns = _csv_header(path, records)
            rows = [
                _csv_row(path, columns, start + offset, record)
                for offset, record in enumerate(itertools.islice(records, start, end))
            ]
    if len(rows) != end - start:
        raise IngestError(
            f"{path}: has only {start + len(rows)} data rows, rows [{start}, {end}) requested "
            "(the list shrank since shards were planned?)"
        )
    return columns, rows


def _jsonl_records(path: Path) -> Generator[dict[str, Any], None, None]:
    """Yield the objects of a JSON Lines file (blank lines skipped); errors name the line."""
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IngestError(f"{path}: line {number}: not JSON: {exc.msg}") from None
                if not isinstance(record, dict):
                    raise IngestError(
                        f"{path}: line {number}: expected a JSON object, got "
                        f"{type(record).__name__}"
                    )
                yield record
        except UnicodeDecodeError as exc:
            raise IngestError(f"{path}: not valid UTF-8: {exc.reason}") from None


def _jsonl_row(columns: list[str], record: dict[str, Any]) -> dict[str, Any]:
    row = {name: cell(record.get(name)) for name in columns}
    row.update({name: cell(value) for name, value in record.items() if name not in row})
    return row


def _csv_row(path: Path, columns: list[str], index: int, record: list[str]) -> dict[str, Any]:
    if len(record) != len(columns):
        raise IngestError(
            f"{path}: data row {index}: {len(record)} fields, header has {len(columns)} ({columns})"
        )
    return {name: cell(value) for name, value in zip(columns, record, strict=True)}


def _parquet_slice(path: Path, start: int, end: int) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        tables: list[pa.Table] = []
        group_start = 0
        # Only read the row groups overlapping the range: lists can have millions of rows.
        for group in range(parquet.num_row_groups):
            group_rows = parquet.metadata.row_group(group).num_rows
            group_end = group_start + group_rows
            if group_end > start and group_start < end:
                table = parquet.read_row_group(group)
                lo = max(start - group_start, 0)
                tables.append(table.slice(lo, min(end, group_end) - group_start - lo))
            group_start = group_end
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: cannot read parquet: {exc}") from None
    rows = [
        {name: cell(value) for name, value in record.items()}
        for table in tables
        for record in table.to_pylist()
    ]
    return columns, rows


def count_rows(url_list: str | Path) -> int:
    """Number of data rows (header excluded); parquet is counted from its metadata."""
    path = _check_list(url_list)
    if path.suffix.lower() == ".parquet":
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{path}: cannot read parquet: {exc}") from None
    if path.suffix.lower() == ".jsonl":
        with contextlib.closing(_jsonl_records(path)) as json_records:
            return sum(1 for _ in json_records)
    with contextlib.closing(_csv_records(path)) as records:
        _csv_header(path, records)
        # Count records, not lines: a quoted CSV caption may span several lines.
        return sum(1 for _ in records)


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Fixed row ranges: appending rows to a list never moves an earlier full shard."""
    if shard_size < 1:
        raise IngestError(f"shard_size must be >= 1, got {shard_size}")
    if n_rows < 0:
        raise IngestError(f"n_rows must be >= 0, got {n_rows}")
    return [(lo, min(lo + shard_size, n_rows)) for lo in range(0, n_rows, shard_size)]


def read_rows(
    url_list: str | Path, start: int, end: int, settings: IngestSettings
) -> list[dict[str, Any]]:
    """Rows [start, end) as dicts of all columns; the configured columns must exist."""
    path = _check_list(url_list)
    columns, rows = _read_slice(path, start, end)
    required = [
        ("url_column", settings.url_column),
        ("caption_column", settings.caption_column),
        ("key_column", settings.key_column),
    ]
    for field, name in required:
        if name is not None and name not in columns:
            raise IngestError(
                f"{path}: column {name!r} (settings.{field}) not found; columns present: {columns}"
            )
    return rows


def rows_digest(url_list: str | Path, start: int, end: int) -> str:
    """Digest of the column names and cells of rows [start, end) only."""
    path = _check_list(url_list)
    columns, rows = _read_slice(path, start, end)
    return _digest(columns, rows)


def _digest(columns: list[str], rows: list[dict[str, Any]]) -> str:
    canonical = json.dumps(
        {"columns": columns, "rows": [_digest_cells(columns, row) for row in rows]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def shard_digest(url_list: str | Path, start: int, end: int) -> str:
    """``rows_digest`` of one shard, computed with all shards of its size in one pass.

    Planning a DAG asks for every shard's digest; reading the list up to each shard
    would cost rows x shards (a 10,000-shard list: hours). The digests of all shards of
    the size ``end - start`` come from one read and are kept while the file is unchanged.
    """
    path = _check_list(url_list)
    stat = path.stat()
    digests = _digests_by_range(str(path), stat.st_size, stat.st_mtime_ns, end - start)
    found = digests.get((start, end))
    return found if found is not None else rows_digest(path, start, end)


@functools.lru_cache(maxsize=8)
def _digests_by_range(
    path_name: str, size: int, mtime_ns: int, shard_size: int
) -> dict[tuple[int, int], str]:
    path = Path(path_name)
    if shard_size < 1:
        return {}
    # One read of the whole list, cut into the ranges.
    columns, rows = _read_slice(path, 0, count_rows(path))
    return {
        (start, min(start + shard_size, len(rows))): _digest(
            columns, rows[start : start + shard_size]
        )
        for start in range(0, len(rows), shard_size)
    }


def _digest_cells(columns: list[str], row: dict[str, Any]) -> list[Any]:
    cells: list[Any] = [row[name] for name in columns]
    # Fields beyond the columns (later JSON Lines fields) count too; none in CSV/parquet,
    # whose digests therefore stay what they were.
    extras = sorted((name, value) for name, value in row.items() if name not in columns)
    if extras:
        cells.append(extras)
    return cells


def resolve_url(url: str, url_list: Path, image_root: str | Path | None = None) -> str:
    """Make ``file:relative/path`` absolute (against the list's folder); leave others as is.

    With ``image_root``, a cell without a scheme is a file path under that folder (a
    captions table of a local image folder names files, not URLs).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url  # malformed: reported as "invalid_url" at download time
    if image_root is not None and not parts.scheme:
        return (Path(image_root).resolve() / url).resolve().as_uri()
    if parts.scheme.lower() != "file" or url.lower().startswith("file:/") or not parts.path:
        return url
    # file:relative/path.jpg: no authority, relative path; may be percent-encoded.
    base = Path(url_list).resolve().parent
    return (base / unquote(parts.path)).resolve().as_uri()


def sanitize_key(raw: str) -> str:
    """A key safe as a tar member / file name and as a WebDataset key."""
    if raw is None or raw == "":
        raise IngestError("empty sample key")
    # '.' is replaced as well: WebDataset splits member names at the first dot, so a key
    # "a.b" would be read back as key "a" with extension "b.jpg". This also rules out
    # leading dots and "..".
    key = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    if len(key) > MAX_KEY_LEN:
        suffix = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:16]
        key = f"{key[: MAX_KEY_LEN - len(suffix) - 1]}_{suffix}"
    return key
