"""Tests for vlmflow.stages.ingest: URL lists, keys, and shards built from file:// and
local http."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from vlmflow.core.contract import FAILURE_REASONS, ReportError, summarize_stats
from vlmflow.stages.ingest import (
    IngestError,
    IngestSettings,
    UrlListSource,
    count_rows,
    fetch,
    ingest_source_shard,
    read_rows,
    resolve_url,
    rows_digest,
    sanitize_key,
    shard_ranges,
)
from vlmflow.stages.ingest import images as image_step

REPO = Path(__file__).resolve().parents[1]
RED = (255, 0, 0)
BLUE = (0, 0, 255)


# --------------------------------------------------------------------------- helpers


def write_list(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as .tsv / .csv / .parquet / .jsonl depending on the suffix."""
    columns = list(rows[0])
    if path.suffix == ".jsonl":
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path
    if path.suffix == ".parquet":
        # Small row groups so that slicing across row-group boundaries is exercised.
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
        return path
    cells = [[("" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    if path.suffix == ".tsv":
        # Plain TSV as found in the wild: no quoting, so quotes are literal characters.
        lines = ["\t".join(columns), *("\t".join(record) for record in cells)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(cells)
    return path


def save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


def noise(size: tuple[int, int]) -> Image.Image:
    """Incompressible pixels, so JPEG scan data fills most of the file."""
    return Image.frombytes(
        "RGB", size, hashlib.sha256(b"seed").digest() * (size[0] * size[1] // 10)
    )


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples keyed like WebDataset does: member name split at the first dot."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            handle = tar.extractfile(member)
            assert handle is not None
            samples.setdefault(key, {})[ext] = handle.read()
    return samples


def tar_member_order(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [name.split(".", 1)[0] for name in tar.getnames()][::3]


def ingest_list(
    url_list: str | Path,
    start: int,
    end: int,
    settings: IngestSettings,
    out_tar: str | Path,
    out_stats: str | Path,
    shard_id: str,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """Rows [start, end) of a URL list into a shard, as the workflow's ingest job does."""
    source = UrlListSource(Path(url_list), image_root)
    return ingest_source_shard(source, start, end, settings, out_tar, out_stats, shard_id)


def reasons_by_row(stats: dict[str, Any]) -> dict[int, str]:
    return {f["row"]: f["reason"] for f in stats["failures"]}


def run_shard(
    url_list: Path,
    settings: IngestSettings,
    out: Path,
    start: int = 0,
    end: int | None = None,
    own_list: bool = True,
) -> dict[str, Any]:
    """Ingest a list; ``own_list``: it is the user's own (its absolute file URLs are read)."""
    end = count_rows(url_list) if end is None else end
    if own_list:
        settings = dataclasses.replace(settings, allow_local_files=True)
    stats = ingest_list(
        url_list, start, end, settings, out / "shard.tar", out / "shard.json", "shard-000"
    )
    # Nothing lost: every row is a sample in the tar or a counted failure with a reason.
    assert stats["rows_in"] == end - start == stats["ok"] + sum(stats["failed"].values())
    assert len(stats["failures"]) == sum(stats["failed"].values())
    assert all(f["reason"] in FAILURE_REASONS for f in stats["failures"])
    assert len(read_tar(out / "shard.tar")) == stats["ok"]
    return stats


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    alpha = Image.new("RGBA", (40, 40), (*BLUE, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half fully transparent (black RGB!)
    # Stored landscape, left red / right blue; orientation 6 = display rotated 90 deg CW,
    # so it shows as a portrait image with red on top.
    exif_img = Image.new("RGB", (80, 40), BLUE)
    exif_img.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    truncated = folder / "truncated.jpg"
    full = io.BytesIO()
    noise((300, 300)).save(full, format="JPEG", quality=95)
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    text = folder / "text.jpg"
    text.write_text("this is not an image\n", encoding="utf-8")
    return {
        "rgb": save(Image.new("RGB", (64, 48), RED), folder / "rgb.jpg", quality=95),
        "alpha": save(alpha, folder / "alpha.png"),
        "cmyk": save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), folder / "cmyk.jpg"),
        "palette": save(Image.new("RGB", (30, 20), BLUE).convert("P"), folder / "palette.png"),
        "tiny": save(Image.new("RGB", (4, 4), RED), folder / "tiny.png"),
        "big": save(Image.new("RGB", (1000, 500), BLUE), folder / "big.jpg"),
        "huge": save(Image.new("L", (1100, 1000), 128), folder / "huge.png"),
        "exif": save(exif_img, folder / "exif.jpg", exif=exif, quality=95),
        "text": text,
        "truncated": truncated,
        # 400 megapixels in a 50 kB file: a decompression bomb.
        "bomb": save(Image.new("1", (20_000, 20_000)), folder / "bomb.png", optimize=True),
    }


def close_to(pixel: Any, color: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, color, strict=True))


# --------------------------------------------------------------------------- URL lists


def test_shard_ranges_cover_rows_and_appending_keeps_full_shards() -> None:
    assert shard_ranges(0, 4) == []
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    before = shard_ranges(10, 4)
    after = shard_ranges(23, 4)
    full_before = [r for r in before if r[1] - r[0] == 4]
    assert after[: len(full_before)] == full_before
    with pytest.raises(IngestError, match="shard_size"):
        shard_ranges(10, 0)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".parquet", ".jsonl"])
def test_count_and_read_rows_all_formats(tmp_path: Path, suffix: str) -> None:
    rows: list[dict[str, Any]] = [
        {"url": f"http://example.com/{i}.jpg", "caption": f"cap {i}", "lang": "en"}
        for i in range(7)
    ]
    rows[2]["caption"] = None  # empty cell
    rows[4]["caption"] = 'a "quoted" caption, with comma'
    path = write_list(tmp_path / f"list{suffix}", rows)
    assert count_rows(path) == 7
    got = read_rows(path, 2, 6, IngestSettings())
    assert got == rows[2:6]


def test_jsonl_lists_keep_unicode_nested_and_late_fields(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(
        '{"url": "http://a/1.jpg", "caption": "Straße am Fluss 🌉", "id": 7}\n'
        "\n"
        '{"url": "http://a/2.jpg", "id": 8, "meta": {"b": 1, "a": [2]}}\n',
        encoding="utf-8",
    )
    assert count_rows(path) == 2
    first, second = read_rows(path, 0, 2, IngestSettings())
    assert first == {"url": "http://a/1.jpg", "caption": "Straße am Fluss 🌉", "id": "7"}
    assert second == {
        "url": "http://a/2.jpg",
        "caption": None,
        "id": "8",
        "meta": '{"a": [2], "b": 1}',
    }


def test_jsonl_empty_first_record_is_still_a_row(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{}\n{"url": "u2", "caption": "c"}\n', encoding="utf-8")
    assert count_rows(path) == 2
    assert rows_digest(path, 0, 1) != rows_digest(path, 1, 2)
    with pytest.raises(IngestError, match="column 'url'"):
        read_rows(path, 1, 2, IngestSettings())  # the first record names no columns


def test_jsonl_digest_sees_fields_beyond_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": "u1"}\n{"url": "u2", "caption": "a"}\n', encoding="utf-8")
    before = rows_digest(path, 1, 2)
    path.write_text('{"url": "u1"}\n{"url": "u2", "caption": "b"}\n', encoding="utf-8")
    assert rows_digest(path, 1, 2) != before


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("list.jsonl", '{"url": "U0", "caption": "c"}\n{"url": oops}\n{"url": "U2"}\n', "not JSON"),
        (
            "list.jsonl",
            '{"url": "U0", "caption": "c"}\n["u", "c"]\n{"url": "U2"}\n',
            "expected a JSON object, got list",
        ),
        ("list.tsv", "url\tcaption\nU0\tok\nhttp://a/2.jpg\nU2\tok\n", "1 fields, header has 2"),
        ("list.csv", 'url,caption\nU0,ok\n"http://a/\udcff.jpg",x\nU2,ok\n', "not valid UTF-8"),
    ],
)
def test_a_record_that_is_no_row_is_a_counted_failure_of_that_row(
    tmp_path: Path, images: dict[str, Path], name: str, text: str, reason: str
) -> None:
    """A bad record fails its own row (``malformed_row``, naming the file and row); the
    rows around it are ingested."""
    path = tmp_path / name
    good = text.replace("U0", images["rgb"].as_uri()).replace("U2", images["big"].as_uri())
    # \udcff: a lone 0xff byte, which is no UTF-8.
    path.write_bytes(good.encode("utf-8", errors="surrogateescape"))
    assert count_rows(path) == 3
    stats = run_shard(path, IngestSettings(), tmp_path / "out")
    assert stats["ok"] == 2 and stats["failed"] == {"malformed_row": 1}
    (failure,) = stats["failures"]
    assert failure["row"] == 1
    assert f"{path}: data row 1: {reason}" in failure["detail"]


def test_count_rows_counts_records_not_lines(tmp_path: Path) -> None:
    path = write_list(
        tmp_path / "multi.csv",
        [{"url": "http://a/1.jpg", "caption": "line one\nline two"}, {"url": "u", "caption": "c"}],
    )
    assert count_rows(path) == 2
    assert read_rows(path, 0, 1, IngestSettings())[0]["caption"] == "line one\nline two"


def test_unsupported_list_type_names_file(tmp_path: Path) -> None:
    path = tmp_path / "urls.json"
    path.write_text("[]")
    with pytest.raises(IngestError, match=r"urls\.json.*\.tsv, \.csv, \.parquet"):
        count_rows(path)


@pytest.mark.parametrize(
    ("settings", "column"),
    [
        (IngestSettings(url_column="URL"), "URL"),
        (IngestSettings(caption_column="TEXT"), "TEXT"),
        (IngestSettings(key_column="id"), "id"),
    ],
)
def test_read_rows_missing_column_names_file_and_column(
    tmp_path: Path, settings: IngestSettings, column: str
) -> None:
    path = write_list(tmp_path / "list.tsv", [{"url": "http://a/1.jpg", "caption": "c"}])
    with pytest.raises(IngestError) as error:
        read_rows(path, 0, 1, settings)
    message = str(error.value)
    assert str(path) in message
    assert repr(column) in message
    assert "'url'" in message and "'caption'" in message  # the columns present


def test_read_rows_beyond_end_is_an_error(tmp_path: Path) -> None:
    path = write_list(tmp_path / "list.csv", [{"url": "u", "caption": "c"}])
    with pytest.raises(IngestError, match=r"only 1 data rows"):
        read_rows(path, 0, 5, IngestSettings())


def test_rows_digest_depends_only_on_rows_in_range(tmp_path: Path) -> None:
    rows = [{"url": f"http://a/{i}.jpg", "caption": f"c{i}"} for i in range(9)]
    path = write_list(tmp_path / "list.tsv", rows)
    digest = rows_digest(path, 3, 6)
    assert len(digest) == 16
    rows[0]["caption"] = "edited outside"
    rows[8]["url"] = "http://a/other.jpg"
    write_list(path, rows)
    assert rows_digest(path, 3, 6) == digest
    rows[4]["caption"] = "edited inside"
    write_list(path, rows)
    assert rows_digest(path, 3, 6) != digest
    # Same content in another format gives the same digest.
    assert rows_digest(write_list(tmp_path / "list.parquet", rows), 3, 6) == rows_digest(path, 3, 6)


def test_resolve_url(tmp_path: Path) -> None:
    url_list = tmp_path / "lists" / "urls.tsv"
    expected = (tmp_path / "lists" / "img" / "a b.jpg").as_uri()
    assert resolve_url("file:img/a%20b.jpg", url_list) == expected
    assert resolve_url("file:img/a b.jpg", url_list) == expected
    assert resolve_url("file:../x.jpg", url_list) == (tmp_path / "x.jpg").as_uri()
    for url in ["file:///abs/x.jpg", "http://h/x.jpg", "https://h/x?y=1", "ftp://h/x"]:
        assert resolve_url(url, url_list) == url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abc-DEF_123", "abc-DEF_123"),
        ("../x", "___x"),
        ("/a/b", "_a_b"),
        (".hidden", "_hidden"),
        ("img.001", "img_001"),  # a dot would split the WebDataset key
        ("café ☕", "caf___"),
    ],
)
def test_sanitize_key(raw: str, expected: str) -> None:
    assert sanitize_key(raw) == expected


def test_sanitize_key_long_and_empty() -> None:
    long_a, long_b = "k" * 300 + "a", "k" * 300 + "b"
    key_a = sanitize_key(long_a)
    assert len(key_a) == 128
    assert key_a.startswith("k" * 100)
    assert key_a != sanitize_key(long_b)  # the hash suffix keeps long keys distinct
    assert sanitize_key(long_a) == key_a
    with pytest.raises(IngestError, match="empty"):
        sanitize_key("")


# --------------------------------------------------------------------------- file:// shards


def test_ingest_shard_file_urls_accounts_for_every_row(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    folder = images["rgb"].parent
    rows: list[dict[str, Any]] = [
        {"url": images["rgb"].as_uri(), "caption": "a red box", "lang": "en"},
        {"url": images["alpha"].as_uri(), "caption": "alpha", "lang": "de"},
        {"url": images["cmyk"].as_uri(), "caption": "cmyk", "lang": None},
        {"url": images["palette"].as_uri(), "caption": None, "lang": "fr"},
        {"url": images["tiny"].as_uri(), "caption": "tiny", "lang": "en"},
        {"url": images["big"].as_uri(), "caption": "big", "lang": "en"},
        {"url": images["huge"].as_uri(), "caption": "huge", "lang": "en"},
        {"url": images["exif"].as_uri(), "caption": "exif", "lang": "en"},
        {"url": images["text"].as_uri(), "caption": "text", "lang": "en"},
        {"url": images["truncated"].as_uri(), "caption": "trunc", "lang": "en"},
        {"url": (folder / "nope.jpg").as_uri(), "caption": "missing", "lang": "en"},
        {"url": None, "caption": "no url", "lang": "en"},
        {"url": "ftp://example.com/a.jpg", "caption": "ftp", "lang": "en"},
        {"url": "images/a.jpg", "caption": "no scheme", "lang": "en"},
        {"url": images["rgb"].as_uri(), "caption": "same url again", "lang": "en"},
    ]
    url_list = write_list(tmp_path / "list.parquet", rows)
    settings = IngestSettings(max_pixels=1_000_000, threads=4)

    stats = run_shard(url_list, settings, tmp_path / "out")

    assert reasons_by_row(stats) == {
        4: "too_small",
        6: "too_large",
        8: "not_image",
        9: "decode_error",
        10: "missing_file",
        11: "missing_url",
        12: "invalid_url",
        13: "invalid_url",
        14: "duplicate",
    }
    assert stats["rows_in"] == len(rows) == stats["ok"] + sum(stats["failed"].values())
    assert stats["ok"] == 6
    assert stats["failed"] == {
        "too_small": 1,
        "too_large": 1,
        "not_image": 1,
        "decode_error": 1,
        "missing_file": 1,
        "missing_url": 1,
        "invalid_url": 2,
        "duplicate": 1,
    }
    assert (stats["shard"], stats["row_start"], stats["row_end"]) == ("shard-000", 0, 15)
    assert json.loads((tmp_path / "out" / "shard.json").read_text()) == stats

    samples = read_tar(tmp_path / "out" / "shard.tar")
    ok_rows = [0, 1, 2, 3, 5, 7]
    keys = [hashlib.sha1(rows[i]["url"].encode()).hexdigest()[:16] for i in ok_rows]
    assert tar_member_order(tmp_path / "out" / "shard.tar") == keys  # row order
    assert set(samples) == set(keys)
    for row_index, key in zip(ok_rows, keys, strict=True):
        sample = samples[key]
        assert set(sample) == {"jpg", "txt", "json"}
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert max(image.size) <= settings.resize.size
        assert (meta["width"], meta["height"]) == image.size
        assert meta["key"] == key and meta["row"] == row_index
        assert meta["url"] == rows[row_index]["url"]
        assert meta["lang"] == rows[row_index]["lang"]
        assert sample["txt"].decode() == (rows[row_index]["caption"] or "") == meta["caption"]

    big = json.loads(samples[keys[4]]["json"])
    assert (big["width"], big["height"]) == (512, 256)
    assert (big["original_width"], big["original_height"]) == (1000, 500)


def test_exif_orientation_and_alpha_on_white(tmp_path: Path, images: dict[str, Path]) -> None:
    rows = [
        {"url": images["exif"].as_uri(), "caption": "exif", "id": "exif"},
        {"url": images["alpha"].as_uri(), "caption": "alpha", "id": "alpha"},
        {"url": images["cmyk"].as_uri(), "caption": "cmyk", "id": "cmyk"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    run_shard(url_list, IngestSettings(key_column="id"), tmp_path)
    samples = read_tar(tmp_path / "shard.tar")
    # WebDataset itself groups the members into the same samples, in row order.
    dataset = wds.WebDataset(str(tmp_path / "shard.tar"), shardshuffle=False)
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in dataset] == [
        (key, ["jpg", "json", "txt"]) for key in ["exif", "alpha", "cmyk"]
    ]

    exif = Image.open(io.BytesIO(samples["exif"]["jpg"]))
    assert exif.size == (40, 80)  # displayed portrait, not the stored landscape
    assert close_to(exif.getpixel((20, 10)), RED)
    assert close_to(exif.getpixel((20, 70)), BLUE)
    meta = json.loads(samples["exif"]["json"])
    assert (meta["original_width"], meta["original_height"]) == (40, 80)

    alpha = Image.open(io.BytesIO(samples["alpha"]["jpg"]))
    assert close_to(alpha.getpixel((5, 20)), (255, 255, 255))  # transparent -> white
    assert close_to(alpha.getpixel((35, 20)), BLUE)

    cmyk = Image.open(io.BytesIO(samples["cmyk"]["jpg"]))
    assert cmyk.mode == "RGB" and close_to(cmyk.getpixel((20, 15)), RED)


def test_gray_alpha_and_large_rotated_jpeg(tmp_path: Path) -> None:
    gray_alpha = Image.new("LA", (40, 40), (0, 255))
    gray_alpha.paste((0, 0), (0, 0, 20, 40))  # left half transparent
    # Large enough that the JPEG is decoded at a reduced DCT scale; stored 1200 x 400,
    # displayed (orientation 6) as 400 x 1200: red on top, blue below.
    stored = Image.new("RGB", (1200, 400), BLUE)
    stored.paste(RED, (0, 0, 600, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    rows = [
        {"url": save(gray_alpha, tmp_path / "la.png").as_uri(), "caption": "", "id": "la"},
        {"url": save(stored, tmp_path / "r.jpg", exif=exif).as_uri(), "caption": "", "id": "r"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    run_shard(url_list, IngestSettings(key_column="id", image_size=256), tmp_path)
    samples = read_tar(tmp_path / "shard.tar")
    la = Image.open(io.BytesIO(samples["la"]["jpg"]))
    assert la.mode == "RGB" and close_to(la.getpixel((5, 20)), (255, 255, 255))
    assert close_to(la.getpixel((35, 20)), (0, 0, 0))
    rotated = Image.open(io.BytesIO(samples["r"]["jpg"]))
    assert rotated.size == (85, 256)
    assert close_to(rotated.getpixel((42, 20)), RED) and close_to(rotated.getpixel((42, 230)), BLUE)
    meta = json.loads(samples["r"]["json"])
    assert (meta["original_width"], meta["original_height"]) == (400, 1200)


def test_relative_file_urls_and_key_column(tmp_path: Path, images: dict[str, Path]) -> None:
    lists = tmp_path / "lists"
    (lists / "pics").mkdir(parents=True)
    (lists / "pics" / "one.jpg").write_bytes(images["rgb"].read_bytes())
    rows = [
        {"url": "file:pics/one.jpg", "caption": "rel", "id": "../evil/one"},
        {"url": images["big"].as_uri(), "caption": "same key", "id": "../evil/one"},
        {"url": images["palette"].as_uri(), "caption": "key", "id": "key"},
    ]
    url_list = write_list(lists / "list.csv", rows)
    stats = run_shard(url_list, IngestSettings(key_column="id"), tmp_path / "out")
    assert reasons_by_row(stats) == {1: "duplicate"}
    assert "same key as row 0" in stats["failures"][0]["detail"]
    samples = read_tar(tmp_path / "out" / "shard.tar")
    assert set(samples) == {"___evil_one", "key"}
    meta = json.loads(samples["___evil_one"]["json"])
    assert meta["url"] == (lists / "pics" / "one.jpg").as_uri()
    assert meta["id"] == "../evil/one"  # the raw key is kept as an extra column


def test_an_empty_key_cell_fails_its_row_only(tmp_path: Path, images: dict[str, Path]) -> None:
    rows: list[dict[str, Any]] = [
        {"url": images["rgb"].as_uri(), "caption": "c", "id": "a"},
        {"url": images["big"].as_uri(), "caption": "c", "id": None},
        {"url": images["exif"].as_uri(), "caption": "c", "id": "c"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    stats = run_shard(url_list, IngestSettings(key_column="id"), tmp_path)
    assert reasons_by_row(stats) == {1: "missing_key"}
    assert "key column 'id' is empty" in stats["failures"][0]["detail"]
    assert set(read_tar(tmp_path / "shard.tar")) == {"a", "c"}


def test_shard_range_uses_absolute_rows(tmp_path: Path, images: dict[str, Path]) -> None:
    rows = [{"url": images[name].as_uri(), "caption": name} for name in ["rgb", "big", "exif"]]
    url_list = write_list(tmp_path / "list.tsv", rows)
    stats = run_shard(url_list, IngestSettings(), tmp_path, start=1, end=3)
    assert (stats["rows_in"], stats["ok"]) == (2, 2)
    metas = [json.loads(s["json"]) for s in read_tar(tmp_path / "shard.tar").values()]
    assert sorted(m["row"] for m in metas) == [1, 2]


def test_failed_write_leaves_no_tar(
    tmp_path: Path, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"url": images[name].as_uri(), "caption": name} for name in ["rgb", "big"]]
    url_list = write_list(tmp_path / "list.tsv", rows)
    out = tmp_path / "out"

    def broken_encoder(image: Image.Image, quality: int = 90) -> bytes:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(image_step, "jpeg_bytes", broken_encoder)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        run_shard(url_list, IngestSettings(threads=2), out)
    assert not (out / "shard.tar").exists()
    assert not (out / "shard.json").exists()
    assert list(out.iterdir()) == []  # no temporary leftovers either


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://", "http://exa mple.com/x", "file:", "file://host/x.jpg"]
)
def test_malformed_urls_are_invalid_url(tmp_path: Path, url: str) -> None:
    url_list = write_list(tmp_path / "l.tsv", [{"url": url, "caption": "c"}])
    stats = run_shard(url_list, IngestSettings(), tmp_path)
    assert stats["failed"] == {"invalid_url": 1}


def test_file_too_large_by_bytes(tmp_path: Path, images: dict[str, Path]) -> None:
    url_list = write_list(tmp_path / "l.tsv", [{"url": images["big"].as_uri(), "caption": "c"}])
    stats = run_shard(url_list, IngestSettings(max_bytes=100), tmp_path)
    assert stats["failed"] == {"too_large": 1}
    assert read_tar(tmp_path / "shard.tar") == {}


# --------------------------------------------------------------------------- http shards


# The test server is on loopback, which ingest refuses unless allowed.
LOCAL = ("127.0.0.0/8",)


class _Handler(BaseHTTPRequestHandler):
    image: ClassVar[bytes] = b""
    truncated: ClassVar[bytes] = b""
    bomb: ClassVar[bytes] = b""
    hits: ClassVar[dict[str, int]] = {}

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.hits[parts.path] = self.hits.get(parts.path, 0) + 1
        time.sleep(float(query.get("delay", ["0"])[0]))
        # The client may have given up already (timeout test).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._respond(parts.path)

    def _respond(self, path: str) -> None:
        if path == "/img.jpg":
            self._send(200, self.image)
        elif path == "/missing":
            self._send(404, b"not found")
        elif path == "/error":
            self._send(503, b"busy")
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif path == "/to-image":
            self.send_response(301)
            self.send_header("Location", "/img.jpg")
            self.end_headers()
        elif path.startswith("/robots/"):
            self.send_response(200)
            self.send_header("X-Robots-Tag", unquote(path.removeprefix("/robots/")))
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        elif path == "/truncated.jpg":
            self._send(200, self.truncated)
        elif path == "/page.html":
            self._send(200, b"<!doctype html><html><body>Moved</body></html>", "text/html")
        elif path == "/bomb.png":
            self._send(200, self.bomb, "image/png")
        elif path in ("/drip", "/drip-headers"):
            self._drip(path == "/drip-headers")
        elif path == "/huge":
            self._send(200, b"\xff" * 500_000)
        elif path == "/huge-no-length":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: body ends when the connection closes
            self.wfile.write(b"\xff" * 500_000)
        else:
            self._send(404, b"?")

    def _drip(self, in_headers: bool) -> None:
        """One byte every 50 ms: never idle long enough for a per-read timeout."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
        if in_headers:
            self.wfile.write(head)
            body = b"X-Slow: " + b"a" * 2000
        else:
            self.wfile.write(head + f"Content-Length: {len(self.image)}\r\n\r\n".encode())
            body = self.image
        for index in range(len(body)):
            self.wfile.write(body[index : index + 1])
            self.wfile.flush()
            time.sleep(0.05)

    def _send(self, code: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _Handler.image = images["rgb"].read_bytes()
    _Handler.truncated = images["truncated"].read_bytes()
    _Handler.bomb = images["bomb"].read_bytes()
    _Handler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_outcomes(tmp_path: Path, server: str) -> None:
    rows = [
        {"url": f"{server}/img.jpg?delay=0.3", "caption": "slow first, still first"},
        {"url": f"{server}/missing", "caption": "404"},
        {"url": f"{server}/img.jpg?delay=2", "caption": "timeout"},
        {"url": f"{server}/huge", "caption": "too large"},
        {"url": f"{server}/huge-no-length", "caption": "too large, streamed"},
        {"url": f"{server}/loop", "caption": "redirect loop"},
        {"url": f"{server}/img.jpg", "caption": "ok"},
        {"url": f"{server}/img.jpg", "caption": "duplicate url"},
        {"url": "http://127.0.0.1:1/refused.jpg", "caption": "connection refused"},
        {"url": f"{server}/truncated.jpg", "caption": "truncated JPEG"},
        {"url": f"{server}/page.html", "caption": "HTML instead of an image"},
        {"url": f"{server}/bomb.png", "caption": "20,000 x 20,000 PNG"},
        {"url": f"{server}/error", "caption": "500-class error"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(
        timeout_s=0.5, retries=0, max_bytes=100_000, threads=8, allowed_networks=LOCAL
    )
    started = time.monotonic()
    stats = run_shard(url_list, settings, tmp_path)
    assert time.monotonic() - started < 5

    assert reasons_by_row(stats) == {
        1: "http_status",
        2: "timeout",
        3: "too_large",
        4: "too_large",
        5: "http_status",
        7: "duplicate",
        8: "connection_error",
        9: "decode_error",
        10: "not_image",
        11: "too_large",
        12: "http_status",
    }
    details = {f["row"]: f["detail"] for f in stats["failures"]}
    assert details[1] == "404" and details[12] == "503"
    assert "400000000 pixels" in details[11]  # refused before decoding a pixel
    assert details[5].startswith("302")
    assert stats["ok"] == 2
    keys = [hashlib.sha1(rows[i]["url"].encode()).hexdigest()[:16] for i in (0, 6)]
    assert tar_member_order(tmp_path / "shard.tar") == keys
    assert _Handler.hits["/img.jpg"] == 3  # the duplicate was not downloaded
    assert _Handler.hits["/bomb.png"] == 1


def test_a_server_that_drips_bytes_times_out_within_timeout_times_attempts(
    tmp_path: Path, server: str
) -> None:
    """timeout_s bounds each attempt from the request to the last byte, not each read."""
    rows = [
        {"url": f"{server}/drip", "caption": "a body at one byte per 50 ms"},
        {"url": f"{server}/drip-headers", "caption": "headers at one byte per 50 ms"},
        {"url": f"{server}/img.jpg", "caption": "ok"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(timeout_s=1, retries=1, threads=3, allowed_networks=LOCAL)
    started = time.monotonic()
    stats = run_shard(url_list, settings, tmp_path)
    elapsed = time.monotonic() - started
    # Two attempts of 1 s and one backoff of 0.5 s, plus a margin for a loaded machine.
    assert elapsed < 2 * 1 + fetch.BACKOFF_BASE_S + 1.5, elapsed
    assert reasons_by_row(stats) == {0: "timeout", 1: "timeout"}
    assert all("within 1 s" in failure["detail"] for failure in stats["failures"])
    assert _Handler.hits["/drip"] == _Handler.hits["/drip-headers"] == 2
    assert stats["ok"] == 1


def test_a_spent_shard_budget_fails_the_rows_not_yet_downloaded(
    tmp_path: Path, server: str
) -> None:
    rows = [{"url": f"{server}/drip?n={index}", "caption": ""} for index in range(4)]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(
        timeout_s=1, retries=0, threads=1, shard_budget_s=1.5, allowed_networks=LOCAL
    )
    started = time.monotonic()
    stats = run_shard(url_list, settings, tmp_path)
    assert time.monotonic() - started < 1.5 + 1.5
    assert stats["failed"] == {"timeout": 4}
    details = [failure["detail"] for failure in stats["failures"]]
    assert "within 1 s" in details[0] and "within 0.5 s" in details[1]
    assert all("ingest.shard_budget_s: 1.5" in detail for detail in details[2:])
    assert _Handler.hits["/drip"] == 2  # the last two were never requested


def test_local_files_in_a_downloaded_list_are_blocked(tmp_path: Path, server: str) -> None:
    sample = REPO / "data" / "sample" / "images" / "0001.jpg"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "own.jpg").write_bytes(sample.read_bytes())
    rows = [
        {"url": "file:///etc/passwd", "caption": "the machine's own file"},
        {"url": sample.as_uri(), "caption": "an image of this repository"},
        {"url": "file://localhost/etc/os-release", "caption": "file://localhost"},
        {"url": "file:../../etc/passwd", "caption": "relative, out of the folder"},
        {"url": "file:pics/own.jpg", "caption": "relative, in the list's folder"},
        {"url": f"{server}/img.jpg", "caption": "a download"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(retries=0, allowed_networks=LOCAL)
    stats = run_shard(url_list, settings, tmp_path / "default", own_list=False)
    assert reasons_by_row(stats) == dict.fromkeys(range(4), "blocked")
    assert "ingest.allow_local_files" in stats["failures"][0]["detail"]
    assert stats["ok"] == 2
    own = run_shard(url_list, settings, tmp_path / "own", own_list=True)
    assert reasons_by_row(own) == {0: "not_image", 2: "not_image", 3: "missing_file"}


def test_plain_paths_are_read_only_under_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    save(Image.new("RGB", (40, 30), RED), root / "sub" / "a.png")
    for name in ("secret.png", "other.png"):
        (tmp_path / name).write_bytes((root / "sub" / "a.png").read_bytes())
    rows = [
        {"url": "sub/a.png", "caption": "inside"},
        {"url": "../secret.png", "caption": "outside"},
        {"url": str(tmp_path / "other.png"), "caption": "absolute"},
    ]
    url_list = write_list(tmp_path / "captions.tsv", rows)
    source = UrlListSource(url_list, image_root=root)
    jobs = source.jobs(0, 3, IngestSettings())
    assert [job.failure.reason if job.failure else None for job in jobs] == [
        None,
        "blocked",
        "blocked",
    ]


def test_http_5xx_is_retried_4xx_is_not(tmp_path: Path, server: str) -> None:
    rows = [
        {"url": f"{server}/error", "caption": "503"},
        {"url": f"{server}/missing", "caption": "404"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(retries=1, timeout_s=2, allowed_networks=LOCAL)
    stats = run_shard(url_list, settings, tmp_path)
    assert [(f["reason"], f["detail"]) for f in stats["failures"]] == [
        ("http_status", "503"),
        ("http_status", "404"),
    ]
    assert _Handler.hits == {"/error": 2, "/missing": 1}


def test_non_public_addresses_are_blocked_by_default(tmp_path: Path, server: str) -> None:
    rows = [
        {"url": f"{server}/img.jpg", "caption": "loopback"},
        {"url": "http://169.254.169.254/latest/meta-data/", "caption": "cloud metadata"},
        {"url": "http://10.1.2.3/a.jpg", "caption": "private"},
        {"url": "http://[::1]:9/a.jpg", "caption": "IPv6 loopback"},
        {"url": "http://[::ffff:192.168.0.1]/a.jpg", "caption": "v4-mapped private"},
        {"url": "http://0.0.0.0/a.jpg", "caption": "unspecified"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    stats = run_shard(url_list, IngestSettings(retries=0, timeout_s=1), tmp_path)
    assert reasons_by_row(stats) == dict.fromkeys(range(6), "blocked")
    assert stats["ok"] == 0 and stats["failed"] == {"blocked": 6}
    assert "169.254.169.254" in stats["failures"][1]["detail"]
    assert _Handler.hits == {}, "nothing was requested"


def test_every_redirect_hop_is_checked(tmp_path: Path, server: str) -> None:
    rows = [
        {"url": f"{server}/to-metadata", "caption": "redirect to the metadata endpoint"},
        {"url": f"{server}/to-image", "caption": "redirect within the allowed network"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(retries=0, timeout_s=1, allowed_networks=LOCAL)
    stats = run_shard(url_list, settings, tmp_path)
    assert reasons_by_row(stats) == {0: "blocked"}
    assert stats["ok"] == 1
    assert _Handler.hits == {"/to-metadata": 1, "/to-image": 1, "/img.jpg": 1}


def test_dns_answer_changed_after_the_check_is_blocked(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the check sees a public address, the connection goes to loopback.
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: ["93.184.216.34"])
    rows = [{"url": f"{server}/img.jpg", "caption": "rebound"}]
    url_list = write_list(tmp_path / "list.tsv", rows)
    stats = run_shard(url_list, IngestSettings(retries=0, timeout_s=1), tmp_path)
    assert reasons_by_row(stats) == {0: "blocked"}
    assert "connected to non-public address 127.0.0.1" in stats["failures"][0]["detail"]


def test_a_connection_whose_peer_cannot_be_read_is_refused(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rebinding check fails closed: a socket urllib3 keeps where the check does not
    # look (another urllib3) means no check, so no image.
    monkeypatch.setattr(fetch, "_peer_address", lambda response: None)
    rows = [{"url": f"{server}/img.jpg", "caption": "peer unknown"}]
    url_list = write_list(tmp_path / "list.tsv", rows)
    stats = run_shard(
        url_list, IngestSettings(retries=0, timeout_s=1, allowed_networks=LOCAL), tmp_path
    )
    assert reasons_by_row(stats) == {0: "blocked"}
    assert "cannot read the address the response came from" in stats["failures"][0]["detail"]


def test_proxies_come_from_the_environment_once_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "images.internal")
    fetch._host_proxies.cache_clear()
    try:
        assert fetch._proxies("http://a.example/x.jpg") == {"http": "http://proxy.example:3128"}
        assert fetch._proxies("http://images.internal/y.jpg") == {}
        assert fetch._proxies("https://a.example/x.jpg") == {}  # no HTTPS_PROXY set
    finally:
        fetch._host_proxies.cache_clear()


def test_x_robots_tag_noai_is_honoured_unless_turned_off(tmp_path: Path, server: str) -> None:
    rows = [
        {"url": f"{server}/robots/noai", "caption": "noai"},
        {"url": f"{server}/robots/noindex,%20noimageai", "caption": "noimageai in a list"},
        {"url": f"{server}/robots/otherbot:%20noai", "caption": "scoped to another crawler"},
        {"url": f"{server}/robots/vlmflow:%20noimageai", "caption": "scoped to us"},
        {"url": f"{server}/robots/noindex", "caption": "not about AI"},
    ]
    url_list = write_list(tmp_path / "list.tsv", rows)
    settings = IngestSettings(retries=0, timeout_s=1, allowed_networks=LOCAL)
    stats = run_shard(url_list, settings, tmp_path / "on")
    assert reasons_by_row(stats) == {0: "robots", 1: "robots", 3: "robots"}
    assert stats["failures"][0]["detail"] == "X-Robots-Tag: noai"
    assert stats["ok"] == 2
    off = run_shard(url_list, replace(settings, respect_robots_header=False), tmp_path / "off")
    assert off["ok"] == 5 and off["failures"] == []


def test_allowed_networks_must_be_networks() -> None:
    with pytest.raises(IngestError, match=r"ingest.allowed_networks: 'intranet' is not a network"):
        IngestSettings(allowed_networks=["intranet"])  # type: ignore[arg-type]
    assert IngestSettings(allowed_networks=["10.0.0.0/8"]).allowed_networks == ("10.0.0.0/8",)


# --------------------------------------------------------------------------- summary


def test_summarize_stats_totals(tmp_path: Path) -> None:
    def stats(shard: str, ok: int, failed: dict[str, int]) -> Path:
        path = tmp_path / f"{shard}.json"
        rows_in = ok + sum(failed.values())
        path.write_text(
            json.dumps(
                {"shard": shard, "rows_in": rows_in, "ok": ok, "failed": failed, "failures": []}
            )
        )
        return path

    table = summarize_stats(
        [stats("s0", 5, {"http_status": 2}), stats("s1", 3, {"timeout": 1, "http_status": 1})]
    )
    assert [row["shard"] for row in table] == ["s0", "s1", "total"]
    total = table[-1]
    assert (total["rows_in"], total["ok"], total["failed"]) == (12, 8, 4)
    assert (total["http_status"], total["timeout"], total["duplicate"]) == (3, 1, 0)
    assert table[0]["timeout"] == 0 and table[0]["failed"] == 2
    assert all(set(row) == set(table[0]) for row in table)  # same columns, 0-filled


def test_summarize_stats_bad_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match=r"broken\.json"):
        summarize_stats([bad])


# --------------------------------------------------------------------------- resize, format


def resized(tmp_path: Path, image: Image.Image, **settings: Any) -> tuple[Image.Image, dict]:
    """The image and metadata ingest writes for ``image`` under these settings."""
    folder = tmp_path / "-".join([*(f"{k}={v}" for k, v in settings.items()), str(image.size)])
    folder.mkdir()
    path = save(image, folder / "in.png")
    url_list = write_list(folder / "list.tsv", [{"url": path.as_uri(), "caption": ""}])
    run_shard(url_list, IngestSettings(**settings), folder)
    [sample] = read_tar(folder / "shard.tar").values()
    return Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), json.loads(sample["json"])


def red_blue(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("keep_ratio", (64, 32)),  # img2dataset's: the shorter side is image_size
        ("keep_ratio_largest", (32, 16)),
        ("center_crop", (32, 32)),
        ("border", (32, 32)),
        ("no", (100, 50)),
    ],
)
def test_resize_modes_mean_what_they_mean_in_img2dataset(
    tmp_path: Path, mode: str, size: tuple[int, int]
) -> None:
    out, meta = resized(tmp_path, red_blue(100, 50), resize_mode=mode, image_size=32)
    assert out.size == (meta["width"], meta["height"]) == size
    assert (meta["original_width"], meta["original_height"]) == (100, 50)
    if mode == "border":  # scaled to 32 x 16, white bars above and below
        assert close_to(out.getpixel((16, 1)), (255, 255, 255))
        assert close_to(out.getpixel((2, 16)), RED) and close_to(out.getpixel((29, 16)), BLUE)
    if mode == "center_crop":  # the middle square: both colours, no bars
        assert close_to(out.getpixel((2, 1)), RED) and close_to(out.getpixel((29, 30)), BLUE)


@pytest.mark.parametrize(
    ("mode", "only_if_bigger", "size"),
    [
        ("keep_ratio", True, (20, 10)),
        ("keep_ratio", False, (64, 32)),
        ("keep_ratio_largest", True, (20, 10)),
        ("keep_ratio_largest", False, (32, 16)),
        ("center_crop", True, (20, 10)),  # as img2dataset: not cropped either
        ("center_crop", False, (32, 32)),
        ("border", True, (20, 10)),
        ("border", False, (32, 32)),
    ],
)
def test_resize_only_if_bigger_leaves_small_images_alone(
    tmp_path: Path, mode: str, only_if_bigger: bool, size: tuple[int, int]
) -> None:
    out, _ = resized(
        tmp_path,
        red_blue(20, 10),
        resize_mode=mode,
        image_size=32,
        resize_only_if_bigger=only_if_bigger,
    )
    assert out.size == size


def test_the_nxtp_seed_command_keeps_the_shorter_side_at_most_image_size(tmp_path: Path) -> None:
    """img2dataset --resize_mode keep_ratio --image_size 512 --resize_only_if_bigger."""
    out, _ = resized(
        tmp_path,
        red_blue(1200, 800),
        resize_mode="keep_ratio",
        image_size=512,
        resize_only_if_bigger=True,
    )
    assert out.size == (768, 512)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        (
            {"resize_mode": "keep_ratio", "max_side": 32},
            {"resize_mode": "keep_ratio_largest"},
            "keep_ratio_largest",
        ),
        ({"resize_mode": "pad", "max_side": 32}, {"resize_mode": "border"}, "border"),
        ({"resize_mode": "none", "max_side": 32}, {"resize_mode": "no"}, "resize_mode: no"),
        (
            {"resize_mode": "center_crop", "max_side": 32},
            {"resize_mode": "center_crop"},
            "image_size",
        ),
    ],
)
def test_the_earlier_names_keep_their_meaning_for_a_release_with_a_warning(
    tmp_path: Path, old: dict[str, Any], new: dict[str, Any], named: str
) -> None:
    with pytest.warns(FutureWarning, match=named):
        before, _ = resized(tmp_path, red_blue(100, 50), **old)
    after, _ = resized(tmp_path, red_blue(100, 50), image_size=32, **new)
    assert before.size == after.size
    if old["resize_mode"] == "pad":  # the earlier pad: black bars (border's are white)
        assert close_to(before.getpixel((16, 1)), (0, 0, 0))
    else:
        assert before.tobytes() == after.tobytes()


def test_keep_ratio_with_max_side_still_caps_the_longer_side_and_never_enlarges(
    tmp_path: Path,
) -> None:
    with pytest.warns(FutureWarning, match="keep_ratio now sets the shorter side"):
        wide, _ = resized(tmp_path, red_blue(100, 50), resize_mode="keep_ratio", max_side=32)
        small, _ = resized(tmp_path, red_blue(20, 10), resize_mode="keep_ratio", max_side=32)
    assert wide.size == (32, 16) and small.size == (20, 10)


def test_webp_shards_are_read_by_every_stage(tmp_path: Path, images: dict[str, Path]) -> None:
    from vlmflow.core.shards import iter_samples

    rows = [{"url": images["rgb"].as_uri(), "caption": "red"}]
    url_list = write_list(tmp_path / "list.tsv", rows)
    run_shard(url_list, IngestSettings(encode_format="webp", webp_quality=80), tmp_path)
    [sample] = read_tar(tmp_path / "shard.tar").values()
    assert set(sample) == {"webp", "txt", "json"}
    assert Image.open(io.BytesIO(sample["webp"])).format == "WEBP"
    [read] = iter_samples(tmp_path / "shard.tar")
    assert read.image_ext == "webp" and close_to(read.image().getpixel((3, 3)), RED)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resize_mode", "stretch", "ingest.resize_mode: 'stretch' is not one of"),
        ("max_side", 64, "ingest.max_side and ingest.image_size are the same setting"),
        ("encode_format", "png", "ingest.encode_format: 'png' is not one of"),
    ],
)
def test_bad_resize_mode_or_format_is_named(field: str, value: Any, message: str) -> None:
    with pytest.raises(IngestError, match=message):
        IngestSettings(**{field: value, "image_size": 64})


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_one_scan_gives_every_shards_digest_and_offset_and_follows_edits(
    tmp_path: Path, suffix: str
) -> None:
    """Planning reads a list once for all shards: their digests are the digests of the
    rows themselves, their offsets read the same rows as reading from the top, and an
    edited list gives a new digest to exactly the edited shard."""
    import pandas as pd

    from vlmflow.stages.ingest import rows_digest, scan_shards

    path = tmp_path / f"urls{suffix}"

    def write(captions: list[str]) -> None:
        frame = pd.DataFrame(
            {
                "url": [f"https://example.org/{i}.jpg" for i in range(len(captions))],
                # A quoted CSV caption spans two lines: offsets count bytes, not lines.
                "caption": [f"{c}\nsecond line" if suffix == ".csv" else c for c in captions],
            }
        )
        if suffix == ".parquet":
            frame.to_parquet(path)
        elif suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)

    write([f"photo {i} ünïcode" for i in range(23)])
    columns, scans = scan_shards(path, 5)
    assert columns == ["url", "caption"]
    assert [(s.start, s.end) for s in scans] == shard_ranges(23, 5)
    first = [scan.digest for scan in scans]
    assert first == [rows_digest(path, s.start, s.end) for s in scans]
    assert len(set(first)) == len(first)
    for scan in scans:
        from_offset = read_rows(path, scan.start, scan.end, IngestSettings(), scan.offset)
        assert from_offset == read_rows(path, scan.start, scan.end, IngestSettings())
    write([f"photo {i} ünïcode" if i != 7 else "edited" for i in range(23)])
    second = [scan.digest for scan in scan_shards(path, 5)[1]]
    assert [a != b for a, b in zip(first, second, strict=True)] == [
        False,
        True,
        False,
        False,
        False,
    ]
