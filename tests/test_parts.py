"""URL lists in parts: part order and shard ids, the part manifests planning reads, and
what a job may read (its own manifest line and rows, never the whole list)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmflow.stages.ingest import IngestError, IngestSettings, list_parts, source_from_config
from vlmflow.stages.ingest import parts as parts_module
from vlmflow.stages.ingest.parts import part_tag, split_shard_id
from vlmflow.stages.ingest.sources import UrlListSource


def rows(first: int, count: int) -> list[dict[str, Any]]:
    return [
        {"key": f"k{i}", "url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"photo {i}"}
        for i in range(first, first + count)
    ]


def write_tsv(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["key\turl\tcaption", *(f"{r['key']}\t{r['url']}\t{r['caption']}" for r in records)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=3)
    return path


def source(url_list: Path | str, manifests: Path, build: bool = True, **extra: Any) -> Any:
    return source_from_config({"url_list": str(url_list), **extra}, "web", manifests, build)


def test_parts_sort_by_name_and_tag_their_shards(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    write_parquet(folder / "part-1.parquet", rows(5, 5))
    write_parquet(folder / "part-0.parquet", rows(0, 5))
    write_tsv(folder / "part.0 b.tsv", rows(10, 1))
    (folder / "README.txt").write_text("not a part")
    (folder / ".hidden.tsv").write_text("key\turl\n")
    assert [(p.tag, p.path.name) for p in list_parts(folder)] == [
        ("part-0", "part-0.parquet"),
        ("part-1", "part-1.parquet"),
        ("part-0-b", "part.0 b.tsv"),  # sorted by file name, not by tag
    ]
    assert [p.path.name for p in list_parts(f"{folder}/part-*.parquet")] == [
        "part-0.parquet",
        "part-1.parquet",
    ]
    assert list_parts(folder / "part-0.parquet")[0].tag is None  # one file: NNNNNN ids
    long = part_tag(Path("x" * 200 + ".tsv"))
    assert len(long) == 80 and long != part_tag(Path("x" * 199 + ".tsv"))
    assert split_shard_id("000012") == (None, 12)
    assert split_shard_id("part-0-b_000003") == ("part-0-b", 3)
    with pytest.raises(IngestError, match="not a shard id"):
        split_shard_id("part_0")


@pytest.mark.parametrize(
    ("names", "pattern", "message"),
    [
        (["a_b.tsv", "a-b.tsv"], "*", "give the same shard tag 'a-b'"),
        (["a.tsv", "b.txt"], "*", r"matches files that are no URL list \(b\.txt\)"),
        (["a.txt"], "", "no URL list parts"),
        ([], "*.parquet", "no URL list parts"),
    ],
)
def test_bad_part_sets_are_refused_by_name(
    tmp_path: Path, names: list[str], pattern: str, message: str
) -> None:
    for name in names:
        write_tsv(tmp_path / "parts" / name, rows(0, 1))
    (tmp_path / "parts").mkdir(exist_ok=True)
    url_list = f"{tmp_path / 'parts'}/{pattern}" if pattern else tmp_path / "parts"
    with pytest.raises(IngestError, match=message):
        list_parts(url_list)


def test_shard_ids_rows_and_digests_come_from_one_read_of_each_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "parts"
    write_parquet(folder / "b.parquet", rows(7, 3))
    write_tsv(folder / "a.tsv", rows(0, 7))
    manifests = tmp_path / "manifests"
    planned = source(folder, manifests)
    assert planned.shard_ids(3) == ["a_000000", "a_000001", "a_000002", "b_000000"]
    assert sorted(p.name for p in manifests.iterdir()) == ["a.tsv", "b.tsv"]
    assert planned.shard_rows("a_000002", 3)["end"] == 7
    rows_b = planned.shard_rows("b_000000", 3)
    assert (rows_b["part"], rows_b["start"], rows_b["end"]) == ("b.parquet", 0, 3)
    assert planned.shard_inputs("b_000000") == [str(folder / "b.parquet")]

    # Planning again (and a job) reads the manifests, not the parts.
    def no_reading(*args: Any) -> None:
        raise AssertionError("a part was read")

    monkeypatch.setattr(parts_module, "scan_shards", no_reading)
    again = source(folder, manifests)
    assert again.shard_ids(3) == planned.shard_ids(3)
    job = source(folder, manifests, build=False)
    assert job.shard_rows("a_000001", 3) == planned.shard_rows("a_000001", 3)
    monkeypatch.undo()

    # An edited part (size or mtime) is read again; the other keeps its manifest.
    before = (manifests / "b.tsv").read_bytes()
    write_tsv(folder / "a.tsv", [*rows(0, 4), {**rows(4, 1)[0], "caption": "edited"}, *rows(5, 2)])
    edited = source(folder, manifests)
    changed = [
        s for s in edited.shard_ids(3) if edited.shard_rows(s, 3) != planned.shard_rows(s, 3)
    ]
    assert changed == ["a_000001"]
    assert (manifests / "b.tsv").read_bytes() == before
    # Another shard size is another cut: the manifests are made again.
    assert source(folder, manifests).shard_ids(5) == ["a_000000", "a_000001", "b_000000"]


def test_a_job_never_reads_a_whole_part(tmp_path: Path) -> None:
    """build=False (a Slurm job): a missing or stale manifest is an error that says what
    to run, and rows that changed since planning are refused, not read as other rows."""
    part = write_tsv(tmp_path / "parts" / "a.tsv", rows(0, 6))
    manifests = tmp_path / "manifests"
    job = source(tmp_path / "parts", manifests, build=False)
    with pytest.raises(IngestError, match=r"a\.tsv is missing; run snakemake again"):
        job.shard_rows("a_000001", 3)
    planned = source(tmp_path / "parts", manifests)
    shard_rows = planned.shard_rows("a_000001", 3)
    _, jobs = job.shard_jobs("a_000001", shard_rows, IngestSettings(key_column="key"))
    assert [j.key for j in jobs] == ["k3", "k4", "k5"]
    write_tsv(part, [*rows(0, 4), {**rows(4, 1)[0], "caption": "edited"}, *rows(5, 1)])
    stat = part.stat()
    with pytest.raises(IngestError, match="stale"):
        source(tmp_path / "parts", manifests, build=False).shard_rows("a_000001", 3)
    # The same size and mtime as planned: the digest still catches the edit.
    os.utime(part, ns=(stat.st_atime_ns, int(planned.parts[0].path.stat().st_mtime_ns)))
    with pytest.raises(IngestError, match=r"rows \[3, 6\) changed since the workflow planned") as e:
        job.shard_jobs("a_000001", shard_rows, IngestSettings(key_column="key"))
    assert str(e.value).endswith(f"run snakemake again after deleting {manifests / 'a.tsv'}")


def test_a_column_missing_from_a_part_names_the_part_column_and_config_key(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "parts"
    write_tsv(folder / "a.tsv", rows(0, 2))
    write_parquet(folder / "b.parquet", [{"key": "x", "link": "http://a/x.jpg", "caption": ""}])
    with pytest.raises(IngestError) as error:
        source(folder, tmp_path / "manifests", key_column="key").shard_ids(10)
    message = str(error.value)
    assert "b.parquet" in message and "'url'" in message
    assert "datasets.web.url_column" in message


def test_a_removed_part_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    write_tsv(folder / "a.tsv", rows(0, 2))
    write_tsv(folder / "b.tsv", rows(2, 2))
    manifests = tmp_path / "manifests"
    assert source(folder, manifests).removed_parts() == []
    source(folder, manifests).shard_ids(1)
    (folder / "b.tsv").unlink()
    remaining = source(folder, manifests)
    assert remaining.shard_ids(1) == ["a_000000", "a_000001"]
    [note] = remaining.removed_parts()
    assert "b.tsv (2 shards, b_NNNNNN) is no longer in the list" in note


def test_a_one_file_list_keeps_its_shard_ids_and_params(tmp_path: Path) -> None:
    """The params of a one-file list's shards are what they were before parts existed:
    {start, end, digest} with the digest of the rows (vlmflow.stages.ingest.rows_digest)."""
    from vlmflow.stages.ingest import rows_digest

    part = write_tsv(tmp_path / "urls.tsv", rows(0, 5))
    planned = source(part, tmp_path / "manifests")
    assert isinstance(planned, UrlListSource)
    assert planned.shard_ids(2) == ["000000", "000001", "000002"]
    assert planned.shard_rows("000001", 2) == {
        "start": 2,
        "end": 4,
        "digest": rows_digest(part, 2, 4),
    }
    assert (tmp_path / "manifests" / "_list.tsv").is_file()
