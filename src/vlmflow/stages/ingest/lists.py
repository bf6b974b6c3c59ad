"""URL lists (.tsv, .csv, .parquet, .jsonl): rows, shard ranges, row digests, URLs, keys.

A list is read as a stream of records, each with the byte offset it starts at (text
formats), so that a part's shards can be found again without reading what comes before
them: ``scan_shards`` reads a list once and gives every shard's row range, byte offset and
digest; ``read_rows`` with an ``offset`` then reads only that shard's records. A record
that is no row (a ragged CSV/TSV record, a JSON Lines line that is not a JSON object,
bytes that are not UTF-8) is a ``BadRow``: it keeps its place in the row order and is
counted as a failure of that row, not of the list. Blank lines are no rows.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import itertools
import json
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from vlmflow.stages.ingest.settings import IngestError, IngestSettings

SUPPORTED_SUFFIXES = (".tsv", ".csv", ".parquet", ".jsonl")


MAX_KEY_LEN = 128
# Rows per batch when a parquet list is read from end to end.
PARQUET_BATCH_ROWS = 16_384


class ListChangedError(IngestError):
    """A shard's rows are no longer the rows its digest was planned from."""


@dataclass(frozen=True)
class BadRow:
    """A record that is no row: why (``reason``) and its text as read (for the digest)."""

    reason: str
    text: str = ""


Row = dict[str, Any] | BadRow
# (byte offset, record) of each record of a list, from the first one asked for.
T = TypeVar("T")
Records = Generator[tuple[int, T], None, None]


@dataclass(frozen=True)
class ShardScan:
    """One shard of a list: rows [start, end), the byte offset of row ``start`` (text
    formats; 0 for parquet) and the digest of its rows (``rows_digest``)."""

    start: int
    end: int
    offset: int
    digest: str


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
    if type(value) is str:  # most cells: one test, not five (planning reads every cell)
        return value if value != "" else None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (dict, list)):  # nested JSON stays JSON, not a Python repr
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = str(value)
    return text if text != "" else None


# --- text lists: records with their byte offsets ------------------------------------------


class _Lines:
    """The lines of a binary file as text for the csv module, with the byte offset reached
    (``position``) and whether a line since ``bad`` was reset was not UTF-8."""

    def __init__(self, handle: IO[bytes], position: int) -> None:
        self.handle = handle
        self.position = position
        self.bad: str | None = None

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.handle.readline()
        if not raw:
            raise StopIteration
        if self.position == 0 and raw.startswith(codecs.BOM_UTF8):
            # Spreadsheet exports often start with a BOM that would rename column 1.
            self.position, raw = len(codecs.BOM_UTF8), raw[len(codecs.BOM_UTF8) :]
        self.position += len(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad = f"not valid UTF-8: {exc.reason}"
            return raw.decode("utf-8", errors="replace")


def _csv_dialect(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".tsv":
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": ","}


def _csv_records(path: Path, offset: int) -> Records[list[str] | BadRow]:
    """(byte offset, fields) of each record from ``offset`` on; blank lines skipped."""
    dialect = _csv_dialect(path)
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = _Lines(handle, offset)
        reader = csv.reader(lines, **dialect)
        while True:
            start, lines.bad = lines.position, None
            record: list[str] | BadRow
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                record = BadRow(f"malformed record: {exc}")
            if record == []:
                continue
            if lines.bad is not None:
                text = record.text if isinstance(record, BadRow) else "\t".join(record)
                record = BadRow(lines.bad, text)
            yield start, record


def _csv_header(path: Path) -> tuple[list[str], int]:
    """The header's column names and the byte offset of the first data record."""
    with contextlib.closing(_csv_records(path, 0)) as records:
        first = next(records, None)
        if first is None:
            raise IngestError(f"{path}: empty file, expected a header row with column names")
        second = next(records, None)
    header = first[1]
    if isinstance(header, BadRow):
        raise IngestError(f"{path}: header row: {header.reason}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise IngestError(f"{path}: duplicate column names in header: {duplicates}")
    return header, (second[0] if second is not None else path.stat().st_size)


def _csv_row(columns: list[str], record: list[str] | BadRow) -> Row:
    if isinstance(record, BadRow):
        return record
    if len(record) != len(columns):
        return BadRow(
            f"{len(record)} fields, header has {len(columns)} ({columns})", "\t".join(record)
        )
    return {name: cell(value) for name, value in zip(columns, record, strict=True)}


def _jsonl_records(path: Path, offset: int) -> Records[dict[str, Any] | BadRow]:
    """(byte offset, object) of each line from ``offset`` on; blank lines skipped."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        position = offset
        for raw in handle:
            start, position = position, position + len(raw)
            line = raw.removeprefix(codecs.BOM_UTF8) if start == 0 else raw
            if not line.strip():
                continue
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                yield start, BadRow(f"not valid UTF-8: {exc.reason}", text)
                continue
            except json.JSONDecodeError as exc:
                yield start, BadRow(f"not JSON: {exc.msg}", text)
                continue
            if not isinstance(record, dict):
                yield start, BadRow(f"expected a JSON object, got {type(record).__name__}", text)
                continue
            yield start, record


def _jsonl_columns(path: Path) -> list[str]:
    """The fields of the first JSON object (a JSON Lines list's columns)."""
    with contextlib.closing(_jsonl_records(path, 0)) as records:
        for _, record in records:
            if isinstance(record, dict):
                return list(record)
    return []


def _jsonl_row(columns: list[str], record: dict[str, Any] | BadRow) -> Row:
    if isinstance(record, BadRow):
        return record
    row = {name: cell(record.get(name)) for name in columns}
    row.update({name: cell(value) for name, value in record.items() if name not in row})
    return row


def _text_rows(path: Path, offset: int | None) -> tuple[list[str], Records[Row]]:
    """Columns, and (byte offset, row) of each row from ``offset`` (default: the first)."""
    try:
        if path.suffix.lower() == ".jsonl":
            columns = _jsonl_columns(path)
            objects = _jsonl_records(path, offset or 0)
            return columns, ((at, _jsonl_row(columns, record)) for at, record in objects)
        header, first = _csv_header(path)
        records = _csv_records(path, first if offset is None else offset)
        return header, ((at, _csv_row(header, record)) for at, record in records)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None


# --- parquet lists ------------------------------------------------------------------------


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{path}: cannot read parquet: {exc}") from None


def _parquet_rows(path: Path) -> tuple[list[str], Records[Row]]:
    """Columns, and (0, row) of every row, read in batches (never the whole file)."""
    parquet = _parquet_file(path)
    columns = list(parquet.schema_arrow.names)

    def rows() -> Records[Row]:
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    yield 0, {name: cell(value) for name, value in record.items()}
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{path}: cannot read parquet: {exc}") from None

    return columns, rows()


def _parquet_slice(path: Path, start: int, end: int) -> tuple[list[str], list[Row]]:
    parquet = _parquet_file(path)
    columns = list(parquet.schema_arrow.names)
    try:
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
    rows: list[Row] = [
        {name: cell(value) for name, value in record.items()}
        for table in tables
        for record in table.to_pylist()
    ]
    return columns, rows


# --- lists of any format ------------------------------------------------------------------


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _read_slice(
    path: Path, start: int, end: int, offset: int | None = None
) -> tuple[list[str], list[Row]]:
    """Columns and rows [start, end) of a checked list; with ``offset`` (text formats: the
    byte offset of row ``start``, from ``scan_shards``), nothing before it is read."""
    if start < 0 or end < start:
        raise IngestError(f"{path}: invalid row range [{start}, {end})")
    if _is_parquet(path):
        columns, rows = _parquet_slice(path, start, end)
    else:
        columns, records = _text_rows(path, offset)
        skip = start if offset is None else 0
        # closing(): islice stops early, so close the generator (and its file) now.
        with contextlib.closing(records):
            rows = [row for _, row in itertools.islice(records, skip, skip + end - start)]
    if len(rows) != end - start:
        raise IngestError(
            f"{path}: has only {start + len(rows)} data rows, rows [{start}, {end}) requested "
            "(the list shrank since shards were planned?)"
        )
    return columns, rows


def count_rows(url_list: str | Path) -> int:
    """Number of data rows (header excluded); parquet is counted from its metadata."""
    path = _check_list(url_list)
    if _is_parquet(path):
        return int(_parquet_file(path).metadata.num_rows)
    # Count records, not lines: a quoted CSV caption may span several lines.
    _, records = _text_rows(path, None)
    with contextlib.closing(records):
        return sum(1 for _ in records)


def scan_shards(url_list: str | Path, shard_size: int) -> tuple[list[str], list[ShardScan]]:
    """Columns and every shard of ``shard_size`` rows, from one read of the list that
    holds one shard's rows at a time."""
    if shard_size < 1:
        raise IngestError(f"shard_size must be >= 1, got {shard_size}")
    path = _check_list(url_list)
    columns, records = _parquet_rows(path) if _is_parquet(path) else _text_rows(path, None)
    shards: list[ShardScan] = []
    with contextlib.closing(records):
        while True:
            batch = list(itertools.islice(records, shard_size))
            if not batch:
                break
            start = shards[-1].end if shards else 0
            rows = [row for _, row in batch]
            shards.append(ShardScan(start, start + len(rows), batch[0][0], _digest(columns, rows)))
    return columns, shards


def shard_ranges(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Fixed row ranges: appending rows to a list never moves an earlier full shard."""
    if shard_size < 1:
        raise IngestError(f"shard_size must be >= 1, got {shard_size}")
    if n_rows < 0:
        raise IngestError(f"n_rows must be >= 0, got {n_rows}")
    return [(lo, min(lo + shard_size, n_rows)) for lo in range(0, n_rows, shard_size)]


def check_columns(path: str | Path, columns: list[str], required: dict[str, str | None]) -> None:
    """Every column ``required`` names ({setting or config key: column}) is in ``columns``."""
    for field, name in required.items():
        if name is not None and name not in columns:
            raise IngestError(
                f"{path}: column {name!r} ({field}) not found; columns present: {columns}"
            )


def _settings_columns(settings: IngestSettings) -> dict[str, str | None]:
    return {
        "settings.url_column": settings.url_column,
        "settings.caption_column": settings.caption_column,
        "settings.key_column": settings.key_column,
    }


def read_rows(
    url_list: str | Path,
    start: int,
    end: int,
    settings: IngestSettings,
    offset: int | None = None,
) -> list[Row]:
    """Rows [start, end) as dicts of all columns (or BadRow); the configured columns must
    exist. ``offset``: see ``_read_slice``."""
    path = _check_list(url_list)
    columns, rows = _read_slice(path, start, end, offset)
    check_columns(path, columns, _settings_columns(settings))
    return rows


def read_shard(url_list: str | Path, shard: ShardScan, settings: IngestSettings) -> list[Row]:
    """A shard's rows, from its byte offset (``offset`` -1: from the top), checked against
    its digest: a list edited since the shard was planned is an error, not other rows."""
    path = _check_list(url_list)
    offset = shard.offset if shard.offset >= 0 else None
    columns, rows = _read_slice(path, shard.start, shard.end, offset)
    digest = _digest(columns, rows)
    if digest != shard.digest:
        raise ListChangedError(
            f"{path}: rows [{shard.start}, {shard.end}) changed since the workflow planned "
            f"them (digest {digest}, planned {shard.digest}); run snakemake again"
        )
    check_columns(path, columns, _settings_columns(settings))
    return rows


def rows_digest(url_list: str | Path, start: int, end: int) -> str:
    """Digest of the column names and cells of rows [start, end) only."""
    path = _check_list(url_list)
    columns, rows = _read_slice(path, start, end)
    return _digest(columns, rows)


def _digest(columns: list[str], rows: list[Row]) -> str:
    canonical = json.dumps(
        {"columns": columns, "rows": [_digest_cells(columns, row) for row in rows]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _digest_cells(columns: list[str], row: Row) -> list[Any]:
    if isinstance(row, BadRow):
        return ["\x00bad row", row.reason, row.text]
    cells: list[Any] = [row[name] for name in columns]
    # Fields beyond the columns (later JSON Lines fields) count too; none in CSV/parquet,
    # whose digests therefore stay what they were. A row has every column as a field.
    if len(row) > len(columns):
        cells.append(sorted((name, value) for name, value in row.items() if name not in columns))
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
