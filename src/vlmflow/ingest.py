"""Ingest stage: download the images of a URL list into WebDataset shards.

A URL list (.tsv, .csv, .parquet or .jsonl) is cut into fixed row ranges ("shards"). Each shard
becomes one tar with ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per downloaded image,
plus a stats json that accounts for every input row: either it is in the tar ("ok") or it
is listed under ``failures`` with a reason.

Conventions worth knowing:

* Cells are read as strings; an empty CSV/TSV cell, a parquet null and a missing or null
  JSON Lines field all become ``None``. A JSON Lines file's columns are the fields of its
  first record (as a CSV header); fields only later records have are kept as extras.
* TSV files are read without quote handling (captions often contain stray ``"``); a TSV
  field therefore cannot contain a tab or a newline. CSV files use standard CSV quoting.
* ``file:relative/path.jpg`` URLs are resolved against the URL list's folder.
* Keys contain only ``[A-Za-z0-9_-]``: a ``.`` would be taken by WebDataset as the start of
  the file extension and split a sample, so dots are replaced too.
* Extra columns are copied into ``{key}.json``; an extra column whose name clashes with a
  field written by this stage (``key``, ``width``, ...) is stored as ``src_<name>``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import ipaddress
import itertools
import json
import os
import re
import socket
import tarfile
import time
import urllib.request
import warnings
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmflow import deadlines
from vlmflow.io import atomic_open, jpeg_bytes, write_json
from vlmflow.logs import progress_bar
from vlmflow.resize import Resize, resize_from_settings

SUPPORTED_SUFFIXES = (".tsv", ".csv", ".parquet", ".jsonl")

# Every failure reason, in the column order used by summarize_stats.
FAILURE_REASONS = (
    "missing_url",
    "invalid_url",
    "duplicate",
    "missing_file",
    "http_status",
    "timeout",
    "connection_error",
    "too_large",
    "not_image",
    "decode_error",
    "too_small",
    "blocked",
    "robots",
)

# X-Robots-Tag directives that say "do not use this image for AI training".
NO_AI_DIRECTIVES = frozenset({"noai", "noimageai"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Fields this stage writes into {key}.json; extra columns with these names get a prefix.
RESERVED_FIELDS = frozenset(
    {"key", "url", "caption", "row", "width", "height", "original_width", "original_height"}
)

# Tar member extension -> Pillow format name.
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP"}

MAX_KEY_LEN = 128
MAX_REDIRECTS = 5
BACKOFF_BASE_S = 0.5
CHUNK_BYTES = 1 << 16
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class IngestSettings:
    url_column: str = "url"
    caption_column: str = "caption"
    key_column: str | None = None  # None: key = sha1(url) hex [:16]
    # img2dataset's resize vocabulary (vlmflow.resize says what each mode does):
    # keep_ratio (shorter side = image_size), keep_ratio_largest, center_crop, border, no.
    resize_mode: str = "keep_ratio_largest"
    image_size: int | None = None  # None: vlmflow.resize.DEFAULT_IMAGE_SIZE
    resize_only_if_bigger: bool = True  # never enlarge (img2dataset's default is false)
    max_side: int | None = None  # image_size's earlier name: one more release, with a warning
    min_side: int = 8  # shorter side (before resize) below this -> failure "too_small"
    encode_format: str = "jpg"  # jpg or webp: the image member's extension in the tar
    jpeg_quality: int = 90
    webp_quality: int = 90
    max_bytes: int = 20_000_000  # response/file larger -> "too_large"
    max_pixels: int = 50_000_000  # decompression-bomb guard -> "too_large"
    timeout_s: float = 10.0  # each attempt, from the request to the last byte of the body
    # A shard's downloads stop after this long: rows not yet downloaded fail as "timeout"
    # (keep it below the profile's runtime for ingest). None: no budget.
    shard_budget_s: float | None = 1500.0
    retries: int = 2  # retries with exponential backoff on timeouts/connection errors/5xx
    threads: int = 8  # downloads in flight
    user_agent: str = "vlmflow/0.1 (image ingest)"
    # Addresses a URL may resolve to although they are loopback, private, link-local
    # (cloud metadata endpoints) or otherwise not public, as CIDRs. Default: none.
    allowed_networks: tuple[str, ...] = ()
    respect_robots_header: bool = True  # X-Robots-Tag noai / noimageai -> "robots"
    # file: URLs and plain paths in a URL list are read only from the list's own folder
    # (relative file: URLs) or under the dataset's image_root; anything else counts as
    # "blocked" unless this says the list is the user's own.
    allow_local_files: bool = False
    resize: Resize = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode is False:
            object.__setattr__(self, "resize_mode", "no")  # YAML reads a bare `no` as false
        try:
            resize, notes = resize_from_settings(
                self.resize_mode, self.image_size, self.max_side, self.resize_only_if_bigger
            )
        except ValueError as exc:
            raise IngestError(str(exc)) from None
        for note in notes:
            warnings.warn(note, FutureWarning, stacklevel=3)
        object.__setattr__(self, "resize", resize)
        if self.encode_format not in ENCODE_FORMATS:
            raise IngestError(
                f"ingest.encode_format: {self.encode_format!r} is not one of "
                f"{', '.join(ENCODE_FORMATS)}"
            )
        # From YAML this is a list; a bad CIDR is a config error, named here.
        networks = tuple(self.allowed_networks)
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise IngestError(
                    f"ingest.allowed_networks: {cidr!r} is not a network: {exc}"
                ) from None
        object.__setattr__(self, "allowed_networks", networks)


class IngestError(ValueError):
    """Bad input (URL list, settings): the message names the file, row/key and field."""


class _Failure(Exception):
    """A per-row failure: recorded in the stats, never raised out of ingest_shard."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class _Image:
    data: bytes  # encoded as settings.encode_format
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


# --------------------------------------------------------------------------- URL lists


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


def _cell(value: Any) -> str | None:
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
    """Columns and rows [start, end) of a checked URL list, cells normalised by _cell."""
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
    row = {name: _cell(record.get(name)) for name in columns}
    row.update({name: _cell(value) for name, value in record.items() if name not in row})
    return row


def _csv_row(path: Path, columns: list[str], index: int, record: list[str]) -> dict[str, Any]:
    if len(record) != len(columns):
        raise IngestError(
            f"{path}: data row {index}: {len(record)} fields, header has {len(columns)} ({columns})"
        )
    return {name: _cell(value) for name, value in zip(columns, record, strict=True)}


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
        {name: _cell(value) for name, value in record.items()}
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


# --------------------------------------------------------------------------- downloads


def _make_session(settings: IngestSettings) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = settings.user_agent
    # Retries are done by _fetch_http (with backoff and our own failure reasons), and
    # redirects by _http_once (each hop's address is checked).
    adapter = deadlines.DeadlineAdapter(
        pool_connections=settings.threads, pool_maxsize=settings.threads, max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # trust_env makes requests scan the environment (proxies, netrc, CA bundle) several
    # times per request: over 1 ms of CPU each with a cluster-sized environment, more
    # than the download itself. The proxies come from _proxies (read once per host)
    # and the CA bundle is read here, once.
    session.trust_env = False
    session.verify = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    return session


@functools.lru_cache(maxsize=4096)
def _host_proxies(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxy for this scheme and host (honouring no_proxy), if any."""
    url = f"{scheme}://{netloc}/"
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    return {scheme: proxy} if proxy else {}


def _proxies(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return _host_proxies(parts.scheme.lower(), parts.netloc.lower())


def _fetch_file(url: str, settings: IngestSettings) -> bytes:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise _Failure("invalid_url", "file URLs must be file:///abs/path or file:rel/path")
    path = Path(urllib.request.url2pathname(parts.path))
    try:
        size = os.stat(path).st_size
        if size > settings.max_bytes:
            raise _Failure("too_large", f"{size} bytes > max_bytes {settings.max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise _Failure("missing_file", str(path)) from None
    except OSError as exc:  # a folder, no permission: the file is not usable either
        raise _Failure("missing_file", f"{path}: {exc.strerror or exc}") from None


# Letters, digits, '-', '_' and '.' (names); ':' and '%' for IPv6 literals and zones.
_HOST_CHARS = re.compile(r"[A-Za-z0-9._:%-]+")


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what the connection may end up using)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _check_address(url: str, settings: IngestSettings) -> None:
    """Refuse URLs whose host is, or resolves to, a non-public address.

    On a cluster node, loopback, private and link-local addresses reach services that
    are not on the internet (cloud metadata endpoints at 169.254.169.254, admin pages);
    a URL list from the web must not be able to make the job fetch them. Checked before
    the first request and again for every redirect.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if host is None:
        raise _Failure("invalid_url", "no host")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise _Failure("invalid_url", f"host {host!r}: {exc}") from None
    if not _HOST_CHARS.fullmatch(ascii_host):
        raise _Failure("invalid_url", f"host {host!r} has characters a host name cannot have")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        addresses = _resolve(host, port)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise _Failure("connection_error", f"cannot resolve {host}: {exc}") from None
    for text in addresses:
        refused = _non_public(text, settings)
        if refused is not None:
            raise _Failure(
                "blocked",
                f"{host} resolves to non-public address {refused} "
                "(ingest.allowed_networks lists the ones to allow)",
            )


def _non_public(text: str, settings: IngestSettings) -> str | None:
    """The address if it is not public and not in allowed_networks, else None."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    allowed = _networks(settings.allowed_networks)
    if address.is_global or any(address in network for network in allowed):
        return None
    return str(address)


def _peer_address(response: requests.Response) -> str | None:
    """The address the response came from, if urllib3 still holds the socket."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:  # a "Connection: close" response: the socket sits in the body reader
        reader = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except OSError:
        return None


def _check_peer(response: requests.Response, settings: IngestSettings) -> None:
    """Refuse a response whose connection went to a non-public address.

    _check_address resolves the host before the request, and the connection resolves it
    again: a DNS answer that changes in between (DNS rebinding) is caught here, before
    any of the body is read.
    """
    peer = _peer_address(response)
    refused = _non_public(peer, settings) if peer is not None else None
    if refused is not None:
        raise _Failure(
            "blocked",
            f"connected to non-public address {refused} although the host resolved to "
            "public ones before (DNS changed?)",
        )


def _robots_forbid(header: str, user_agent: str) -> str | None:
    """The X-Robots-Tag directive that forbids AI use for us, if any.

    Directives may be scoped to a crawler ("otherbot: noai"); only unscoped ones and
    those naming our user agent's product token apply.
    """
    product = user_agent.split("/", 1)[0].strip().lower()
    for part in header.split(","):
        scope, _, directive = part.rpartition(":")
        scope, directive = scope.strip().lower(), directive.strip().lower()
        if directive in NO_AI_DIRECTIVES and scope in ("", product):
            return part.strip()
    return None


def _http_once(
    url: str, settings: IngestSettings, session: requests.Session, seconds: float
) -> bytes:
    """One attempt, from the request to the body's last byte within ``seconds``."""
    with deadlines.attempt(seconds) as attempt:
        try:
            return _http_hops(url, settings, session, attempt)
        except _Failure as failure:
            raise _expired(attempt) if attempt.expired else failure from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if attempt.expired:
                raise _expired(attempt) from None
            raise _request_failure(exc) from None


def _expired(attempt: deadlines.Attempt) -> _Failure:
    return _Failure(
        "timeout", f"no whole response within {round(attempt.seconds, 1):g} s", retryable=True
    )


def _http_hops(
    url: str, settings: IngestSettings, session: requests.Session, attempt: deadlines.Attempt
) -> bytes:
    timeout = (settings.timeout_s, settings.timeout_s)  # each connect and each read
    # Redirects are followed here, not by requests, so each hop's address is checked.
    for _hop in range(MAX_REDIRECTS + 1):
        _check_address(url, settings)
        proxies = _proxies(url)
        with session.get(
            url, stream=True, timeout=timeout, allow_redirects=False, proxies=proxies
        ) as response:
            if not proxies:  # through a proxy, the peer is the proxy
                _check_peer(response, settings)
            status = response.status_code
            location = response.headers.get("Location")
            if status in REDIRECT_STATUSES and location:
                url = urljoin(url, location)
                continue
            body = _read_body(response, settings)
            # Before the connection goes back to the pool; a body cut short by the
            # deadline (a server that ends it by closing) is not a whole image.
            attempt.stop()
            if attempt.expired:
                raise _expired(attempt)
            return body
    raise _Failure("http_status", f"{status} (more than {MAX_REDIRECTS} redirects)")


def _request_failure(exc: BaseException) -> _Failure:
    """The failure reason of an exception from requests (or the socket under it)."""
    if isinstance(exc, requests.Timeout):
        return _Failure("timeout", str(exc), retryable=True)
    invalid = (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        urllib3.exceptions.LocationParseError,
        UnicodeError,  # IDNA encoding of the host name failed
    )
    if isinstance(exc, invalid):
        return _Failure("invalid_url", str(exc))
    if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        # requests reports a read timeout *while streaming the body* as a ConnectionError.
        cause = exc.args[0] if exc.args else None
        reason = "timeout" if isinstance(cause, urllib3.exceptions.ReadTimeoutError) else None
        return _Failure(reason or "connection_error", str(exc), retryable=True)
    # e.g. a broken gzip body or invalid headers
    return _Failure("connection_error", f"{type(exc).__name__}: {exc}")


def _read_body(response: requests.Response, settings: IngestSettings) -> bytes:
    status = response.status_code
    if not 200 <= status < 300:
        raise _Failure("http_status", str(status), retryable=status >= 500)
    if settings.respect_robots_header:
        forbidden = _robots_forbid(response.headers.get("X-Robots-Tag", ""), settings.user_agent)
        if forbidden:
            raise _Failure("robots", f"X-Robots-Tag: {forbidden}")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > settings.max_bytes:
        raise _Failure("too_large", f"Content-Length {length} > {settings.max_bytes}")
    body = bytearray()
    # Counted after content decoding, so a gzip bomb is caught as well.
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > settings.max_bytes:
            raise _Failure("too_large", f"body > max_bytes {settings.max_bytes}")
    return bytes(body)


def _fetch_http(
    url: str, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> bytes:
    for attempt in range(settings.retries + 1):
        seconds = settings.timeout_s
        if shard_deadline is not None:
            left = shard_deadline - time.monotonic()
            if left <= 0:
                raise _Failure(
                    "timeout",
                    f"the shard's budget (ingest.shard_budget_s: {settings.shard_budget_s:g}) "
                    "was spent before this download's attempt "
                    f"{attempt + 1} of {settings.retries + 1}",
                )
            seconds = min(seconds, left)
        try:
            return _http_once(url, settings, session, seconds)
        except _Failure as failure:
            if not failure.retryable or attempt == settings.retries:
                raise
            time.sleep(BACKOFF_BASE_S * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _fetch(
    url: str, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> bytes:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1" (unbalanced IPv6 bracket)
        raise _Failure("invalid_url", str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _fetch_file(url, settings)
    if scheme in ("http", "https") and parts.netloc:
        return _fetch_http(url, settings, session, shard_deadline)
    if not scheme:
        raise _Failure("invalid_url", "no URL scheme (use file:relative/path for local files)")
    raise _Failure("invalid_url", f"unsupported URL scheme {scheme!r} or no host")


# --------------------------------------------------------------------------- images


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (JPEG has no alpha)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _process_image(data: bytes, settings: IngestSettings) -> _Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _Failure("too_large", str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _Failure("not_image", str(exc)) from None
    with image:
        # Image.open only parsed the header: check the size before decoding any pixels.
        width, height = image.size
        if width * height > settings.max_pixels:
            raise _Failure("too_large", f"{width}x{height} pixels > max_pixels")
        if min(width, height) < settings.min_side:
            raise _Failure("too_small", f"{width}x{height}, min_side {settings.min_side}")
        try:
            # JPEG only: decode at the smallest DCT scale (1/2 .. 1/8) that still leaves
            # at least the pixels of the resized image: far less work for large photos.
            # (EXIF rotation swaps the axes; the bound is symmetric.)
            image.draft("RGB", settings.resize.decode_size(width, height))
            image.load()
            upright = ImageOps.exif_transpose(image)
            # Orientations 5-8 swap the axes; report the original size as displayed so
            # that it has the same aspect as width/height.
            swapped = upright.size != image.size
            rgb = _to_rgb(upright)
        except Image.DecompressionBombError as exc:
            raise _Failure("too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _Failure("decode_error", str(exc)) from None
    original_width, original_height = (height, width) if swapped else (width, height)
    rgb = settings.resize(rgb)
    return _Image(
        data=_encode(rgb, settings),
        ext=settings.encode_format,
        width=rgb.width,
        height=rgb.height,
        original_width=original_width,
        original_height=original_height,
    )


def _encode(image: Image.Image, settings: IngestSettings) -> bytes:
    if settings.encode_format == "jpg":
        return jpeg_bytes(image, quality=settings.jpeg_quality)
    buffer = io.BytesIO()
    image.save(buffer, format=ENCODE_FORMATS[settings.encode_format], quality=settings.webp_quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class _Job:
    row: int  # absolute row index in the URL list
    key: str | None
    url: str  # resolved URL ("" when the cell is empty)
    caption: str
    extra: dict[str, Any]
    failure: _Failure | None = None  # decided before downloading (missing_url, duplicate)
    data: bytes | None = None  # the image itself, for sources that carry it (no download)


def _row_key(
    row: dict[str, Any], url: str, path: Path, index: int, settings: IngestSettings
) -> str:
    if settings.key_column is None:
        return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]
    raw = row[settings.key_column]
    if raw is None or not raw.strip():
        raise IngestError(
            f"{path}: data row {index}: key column {settings.key_column!r} is empty; "
            "every row needs a key (or leave settings.key_column unset to hash the URL)"
        )
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
    rows: list[dict[str, Any]],
    start: int,
    settings: IngestSettings,
    image_root: str | Path | None = None,
) -> list[_Job]:
    """One job per row; duplicates and empty URLs are decided here, not downloaded."""
    jobs: list[_Job] = []
    seen_keys: dict[str, int] = {}
    seen_urls: dict[str, int] = {}
    for offset, row in enumerate(rows):
        index = start + offset
        cell = (row[settings.url_column] or "").strip()
        caption = row[settings.caption_column] or ""
        extra = _extra_columns(row, settings)
        if not cell:
            # A key column still gives the failure a key; a URL hash would be meaningless.
            key = _row_key(row, cell, path, index, settings) if settings.key_column else None
            missing = _Failure("missing_url", f"column {settings.url_column!r} is empty")
            jobs.append(_Job(index, key, "", caption, extra, missing))
            continue
        # Keys hash the URL as written, so moving the list folder keeps keys stable.
        key = _row_key(row, cell, path, index, settings)
        url = resolve_url(cell, path, image_root)
        failure = _duplicate_of(key, url, seen_keys, seen_urls)
        if failure is None:
            seen_keys[key] = seen_urls[url] = index
            failure = _local_file_refused(cell, url, path, image_root, settings)
        jobs.append(_Job(index, key, url, caption, extra, failure))
    return jobs


def _local_file_refused(
    cell: str, url: str, path: Path, image_root: str | Path | None, settings: IngestSettings
) -> _Failure | None:
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
    return _Failure(
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
) -> _Failure | None:
    if key in seen_keys:
        return _Failure("duplicate", f"same key as row {seen_keys[key]}")
    if url in seen_urls:
        return _Failure("duplicate", f"same url as row {seen_urls[url]}")
    return None


def _run_job(
    job: _Job, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> _Image | _Failure:
    """Download and re-encode one image; expected per-row problems come back as _Failure."""
    if job.failure is not None:
        return job.failure
    try:
        data = job.data
        if data is None:
            data = _fetch(job.url, settings, session, shard_deadline)
        elif len(data) > settings.max_bytes:
            raise _Failure("too_large", f"{len(data)} bytes > max_bytes {settings.max_bytes}")
        return _process_image(data, settings)
    except _Failure as failure:
        return failure


def _results_in_order(
    jobs: list[_Job], settings: IngestSettings
) -> Generator[tuple[_Job, _Image | _Failure], None, None]:
    """Yield (job, result) in row order while at most a bounded window is in flight.

    The window keeps memory bounded (only finished-but-not-yet-written images are held)
    and the output order independent of which download finishes first.
    """
    window = max(1, settings.threads) * 4
    budget = settings.shard_budget_s
    shard_deadline = None if budget is None else time.monotonic() + budget
    session = _make_session(settings)
    pool = ThreadPoolExecutor(max_workers=max(1, settings.threads), thread_name_prefix="ingest")
    pending: deque[tuple[_Job, Future[_Image | _Failure]]] = deque()
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


def image_digest(data: bytes) -> str:
    """What makes two stored images the same: their bytes after decode and re-encode."""
    return hashlib.sha256(data).hexdigest()[:32]


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


def _sample(job: _Job, image: _Image) -> dict[str, Any]:
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


def ingest_shard(
    url_list: str | Path,
    start: int,
    end: int,
    settings: IngestSettings,
    out_tar: str | Path,
    out_stats: str | Path,
    shard_id: str,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Download rows [start, end) of a URL list into a WebDataset tar; write the stats.

    ``image_root``: the folder that URL cells without a scheme (plain relative paths, as
    in a captions table of a local image folder) are relative to.
    """
    path = _check_list(url_list)
    rows = read_rows(path, start, end, settings)
    jobs = plan_jobs(path, rows, start, settings, image_root)
    source = f"url_list:{url_list}"  # as vlmflow.sources.UrlListSource describes itself
    return write_shard(jobs, source, start, end, settings, out_tar, out_stats, shard_id)


def write_shard(
    jobs: list[_Job],
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
                if isinstance(result, _Failure):
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


def summarize_stats(stats_paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per shard plus a "total" row, with a 0-filled column per failure reason."""
    shards = [_read_stats(stats_path) for stats_path in stats_paths]
    # Known reasons always get a column (a stable table schema); unknown ones are appended.
    extra = sorted({reason for *_, by in shards for reason in by} - set(FAILURE_REASONS))
    reasons = [*FAILURE_REASONS, *extra]
    table: list[dict[str, Any]] = [
        {
            "shard": shard,
            "rows_in": rows_in,
            "ok": ok,
            "failed": sum(failed_by.values()),
            **{reason: failed_by.get(reason, 0) for reason in reasons},
        }
        for shard, rows_in, ok, failed_by in shards
    ]
    total: dict[str, Any] = {"shard": "total"}
    for column in ["rows_in", "ok", "failed", *reasons]:
        total[column] = sum(row[column] for row in table)
    return [*table, total]


def _read_stats(stats_path: str | Path) -> tuple[str, int, int, dict[str, int]]:
    """(shard, rows_in, ok, failed-by-reason) of one stats json, checked for consistency."""
    try:
        with open(stats_path, encoding="utf-8") as handle:
            stats = json.load(handle)
        shard, rows_in, ok = str(stats["shard"]), int(stats["rows_in"]), int(stats["ok"])
        failed_by = {str(reason): int(n) for reason, n in stats["failed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IngestError(f"{stats_path}: not a readable ingest stats file: {exc!r}") from None
    if rows_in != ok + sum(failed_by.values()):
        raise IngestError(f"{stats_path}: rows_in {rows_in} != ok {ok} + failed {failed_by}")
    return shard, rows_in, ok, failed_by
