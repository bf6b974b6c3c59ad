"""Atomic file writes and shard readers shared by every stage.

Every output is first written to a temporary file in the destination folder and then
renamed over the final name, so a job killed by Slurm never leaves a half-written file
that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that becomes ``path`` when closed cleanly."""
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it to ``path`` on success.

    An existing folder at ``path`` is replaced (removed first), since Snakemake
    removes outputs before rerunning a job anyway.
    """
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_parquet(path: str | os.PathLike[str], table: pa.Table) -> None:
    """Write an Arrow table as parquet, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a parquet file as a list of row dicts."""
    return pq.read_table(path).to_pylist()


def write_rows_parquet(
    path: str | os.PathLike[str], rows: list[dict[str, Any]], schema: pa.Schema
) -> None:
    """Write row dicts with an explicit schema (so empty shards keep their columns)."""
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def stable_seed(*parts: object) -> int:
    """A 31-bit seed derived from ``parts``: the same inputs give the same seed anywhere.

    Python's ``hash`` is salted per process, so it cannot be used for this.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def jpeg_bytes(image: Any, quality: int = 90) -> bytes:
    """Encode a PIL image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def failure_reason(failure: str) -> str:
    """A failure's reason without its detail: ``generation_error: CUDA out of memory`` ->
    ``generation_error`` (stage outputs write ``reason: detail``)."""
    return failure.split(":", 1)[0].strip() or "unknown"


def html_page(title: str, body: str, style: str) -> str:
    """A self-contained report page: inline CSS, no scripts, nothing fetched."""
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def image_digest(data: bytes) -> str:
    """What makes two stored images the same: their bytes after decode and re-encode."""
    return hashlib.sha256(data).hexdigest()[:32]
