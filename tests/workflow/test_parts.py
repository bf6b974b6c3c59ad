"""URL lists in parts through the workflow: a folder of parquet parts and a glob of TSV
parts give the rows one concatenated list gives; adding a part runs only its shards,
editing a row reruns only its shard, a removed part is reported, a part without a
configured column stops the DAG build."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_ingest import read_tar
from tests.workflow.conftest import (
    REPO,
    assert_only_ingest_of,
    job_counts,
    load_config,
    make_workdir,
    read_rows,
    save_config,
    snakemake,
)

pytestmark = pytest.mark.workflow

SAMPLE = REPO / "data" / "sample"
# Rows per part; shard_size 4: parts of 5 and 6 rows give shards of 4+1 and 4+2 rows,
# the concatenated list 4+4+3.
SPLIT = (5, 6)
DATASETS = ("whole", "parquet", "tsv")


def sample_rows() -> list[dict[str, str]]:
    rows = []
    for row in read_rows(SAMPLE / "train.tsv")[: sum(SPLIT)]:
        name = Path(row["url"].removeprefix("file:")).name
        rows.append({"key": row["key"], "url": f"file:images/{name}", "caption": row["caption"]})
    rows[7]["key"] = ""  # an empty key: that row fails as missing_key, the others go on
    return rows


def write_part(path: Path, rows: list[dict[str, str]]) -> None:
    """A list with its images beside it (file:images/NAME stays inside its folder)."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row["url"].removeprefix("file:images/")
        shutil.copy(SAMPLE / "images" / name, path.parent / "images" / name)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["key", "url", "caption"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def parts(rows: list[dict[str, str]]) -> Iterator[tuple[int, list[dict[str, str]]]]:
    start = 0
    for number, size in enumerate(SPLIT):
        yield number, rows[start : start + size]
        start += size


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workdir(tmp_path_factory.mktemp("parts"))
    rows = sample_rows()
    write_part(root / "data" / "whole" / "urls.tsv", rows)
    for number, part in parts(rows):
        write_part(root / "data" / "parquet" / f"part-{number}.parquet", part)
        write_part(root / "data" / "tsv" / f"part-{number}.tsv", part)
    config = load_config(root)
    common = {"key_column": "key", "shard_size": 4}
    config["datasets"].update(
        {
            "whole": {"url_list": "data/whole/urls.tsv", **common},
            "parquet": {"url_list": "data/parquet", **common},
            "tsv": {"url_list": "data/tsv/part-*.tsv", **common},
        }
    )
    save_config(root, config)
    run = snakemake(root, *summaries())
    assert run.returncode == 0, run.stderr[-3000:]
    return root


def summaries() -> list[str]:
    return [f"results/{name}/ingest_summary.tsv" for name in DATASETS]


def samples(workdir: Path, dataset: str) -> dict[str, dict[str, Any]]:
    """Every ingested sample of a dataset: caption, image bytes and source columns."""
    found: dict[str, dict[str, Any]] = {}
    for tar_path in sorted((workdir / "results" / dataset / "shards").glob("*.tar")):
        found.update(read_tar(tar_path))
    for sample in found.values():
        meta = json.loads(sample.pop("json"))
        sample["meta"] = {k: meta[k] for k in ("key", "caption", "width", "height")}
    return found


def total(workdir: Path, dataset: str) -> dict[str, str]:
    with open(workdir / f"results/{dataset}/ingest_summary.tsv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))[-1]


def test_parts_ingest_to_the_rows_of_the_concatenated_list(workdir: Path) -> None:
    shards = {
        dataset: sorted(p.name for p in (workdir / f"results/{dataset}/shards").glob("*.tar"))
        for dataset in DATASETS
    }
    assert shards["whole"] == ["000000.tar", "000001.tar", "000002.tar"]
    tagged = ["part-0_000000.tar", "part-0_000001.tar", "part-1_000000.tar", "part-1_000001.tar"]
    assert shards["parquet"] == shards["tsv"] == tagged
    whole = samples(workdir, "whole")
    assert len(whole) == sum(SPLIT) - 1
    assert samples(workdir, "parquet") == whole
    assert samples(workdir, "tsv") == whole
    for dataset in DATASETS:
        row = total(workdir, dataset)
        assert (row["rows_in"], row["ok"], row["missing_key"]) == ("11", "10", "1"), dataset
    stats = json.loads((workdir / "results/tsv/shards/part-1_000000.stats.json").read_text())
    assert stats["source"] == "url_list:data/tsv/part-1.tsv"
    assert (stats["row_start"], stats["row_end"]) == (0, 4)


def test_a_new_part_runs_only_its_shards_and_a_removed_one_is_reported(workdir: Path) -> None:
    # "part-0a" sorts between the two parts: no shard of part-1 is renamed.
    new = workdir / "data" / "tsv" / "part-0a.tsv"
    rows = [{**row, "key": f"new{i}"} for i, row in enumerate(sample_rows()[:3])]
    write_part(new, rows)
    try:
        dry = snakemake(workdir, "-n", *summaries())
    finally:
        new.unlink()
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    assert_only_ingest_of(output, "results/tsv/shards/part-0a_000000.tar")
    # Gone again: planning says so, and plans the shards that are left.
    dry = snakemake(workdir, "-n", *summaries())
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    assert "part data/tsv/part-0a.tsv (1 shards, part-0a_NNNNNN) is no longer in the list" in (
        output
    )
    assert job_counts(output) == {}
    (workdir / "results/tsv/parts/part-0a.tsv").unlink()


def test_an_edited_row_reruns_only_its_shard(workdir: Path) -> None:
    part = workdir / "data" / "parquet" / "part-1.parquet"
    original = part.read_bytes()
    rows = pq.read_table(part).to_pylist()
    rows[5]["caption"] = "an edited caption"  # row 5 of part-1: shard part-1_000001
    pq.write_table(pa.Table.from_pylist(rows), part)
    try:
        dry = snakemake(workdir, "-n", *summaries())
    finally:
        part.write_bytes(original)
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    assert_only_ingest_of(output, "results/parquet/shards/part-1_000001.tar")
    # The part as it was (a new mtime): its manifest is made again, and nothing reruns.
    dry = snakemake(workdir, "-n", *summaries())
    assert job_counts(dry.stdout + dry.stderr) == {}


def test_a_part_without_a_configured_column_stops_the_dag_build(workdir: Path) -> None:
    broken = workdir / "data" / "tsv" / "part-2.tsv"
    broken.write_text("key\tlink\tcaption\nx\thttp://a/x.jpg\tc\n", encoding="utf-8")
    try:
        dry = snakemake(workdir, "-n", *summaries())
    finally:
        broken.unlink()
    output = dry.stdout + dry.stderr
    assert dry.returncode != 0
    assert (
        "config.datasets.tsv: data/tsv/part-2.tsv: column 'url' (datasets.tsv.url_column) "
        "not found" in output
    )
    shutil.rmtree(workdir / "results/tsv/parts", ignore_errors=True)
