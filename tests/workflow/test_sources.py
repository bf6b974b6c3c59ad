"""Every source kind through the workflow's ingest rule, and reruns when a source grows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pytest
import webdataset as wds

from tests.workflow.conftest import (
    REPO,
    assert_only_ingest_of,
    load_config,
    make_workdir,
    save_config,
    snakemake,
)

pytestmark = pytest.mark.workflow

SAMPLE = REPO / "data" / "sample"
KINDS = ["folder", "table", "coco", "hf", "tars"]


def sample_rows(n: int) -> list[dict[str, str]]:
    with open(SAMPLE / "train.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))[:n]
    for row in rows:
        row["file"] = Path(row["url"].removeprefix("file:")).name
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workdir(tmp_path_factory.mktemp("sources"))
    data = root / "data"
    rows = sample_rows(6)
    # An image folder with captions beside the images (one without a caption file).
    (data / "folder").mkdir()
    for index, row in enumerate(rows):
        shutil.copy(SAMPLE / "images" / row["file"], data / "folder" / row["file"])
        if index != 2:
            caption = data / "folder" / row["file"]
            caption.with_suffix(".txt").write_text(row["caption"], encoding="utf-8")
    # The same images with a captions table naming plain file paths.
    with open(data / "captions.tsv", "w", encoding="utf-8") as handle:
        handle.write("file\tcaption\n")
        handle.writelines(f"{row['file']}\t{row['caption']}\n" for row in rows)
    # COCO: two captions per image.
    coco = {
        "images": [{"id": i, "file_name": row["file"]} for i, row in enumerate(rows)],
        "annotations": [
            {"id": 2 * i + j, "image_id": i, "caption": f"{row['caption']} ({j})"}
            for i, row in enumerate(rows)
            for j in range(2)
        ],
    }
    (data / "coco.json").write_text(json.dumps(coco), encoding="utf-8")
    # A Hugging Face dataset saved to disk.
    datasets.Dataset.from_dict(
        {
            "new_key": [f"hf{i}" for i in range(len(rows))],
            "png": [(SAMPLE / "images" / row["file"]).read_bytes() for row in rows],
            "caption": [row["caption"] for row in rows],
        }
    ).save_to_disk(str(data / "hf"))
    # Two existing WebDataset tars of 3 samples.
    for part in range(2):
        with wds.TarWriter(str(data / f"tars-{part}.tar"), encoder=False) as sink:
            for row in rows[3 * part : 3 * part + 3]:
                jpg = (SAMPLE / "images" / row["file"]).read_bytes()
                sink.write({"__key__": row["key"], "jpg": jpg, "txt": row["caption"].encode()})
    config = load_config(root)
    config["datasets"].update(
        {
            "folder": {"image_folder": "data/folder", "shard_size": 4},
            "table": {
                "url_list": "data/captions.tsv",
                "image_root": "data/folder",
                "url_column": "file",
                "shard_size": 4,
            },
            "coco": {
                "coco": {"annotations": "data/coco.json", "images": "data/folder"},
                "shard_size": 4,
            },
            "hf": {"hf_dataset": "data/hf", "key_column": "new_key", "shard_size": 4},
            "tars": {"webdataset": "data/tars-*.tar"},
        }
    )
    save_config(root, config)
    return root


def summaries() -> list[str]:
    return [f"results/{kind}/ingest_summary.tsv" for kind in KINDS]


@pytest.fixture
def ingested(workdir: Path) -> Path:
    """Every source kind ingested in the module's folder: made by the first test that
    needs it, a no-op for the others, so each test also passes alone or on its own
    pytest-xdist worker."""
    run = snakemake(workdir, *summaries())
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def test_every_source_kind_ingests_every_row(workdir: Path) -> None:
    run = snakemake(workdir, *summaries())
    assert run.returncode == 0, run.stderr[-3000:]
    for kind in KINDS:
        with open(workdir / f"results/{kind}/ingest_summary.tsv", encoding="utf-8") as handle:
            total = list(csv.DictReader(handle, delimiter="\t"))[-1]
        assert (total["shard"], total["rows_in"], total["ok"]) == ("total", "6", "6"), kind
    # Two shards each: 4 + 2 rows, or one per tar (3 + 3).
    for kind in KINDS:
        assert sorted(p.name for p in (workdir / f"results/{kind}/shards").glob("*.tar")) == [
            "000000.tar",
            "000001.tar",
        ]
    stats = json.loads((workdir / "results/coco/shards/000000.stats.json").read_text())
    assert stats["source"].startswith("coco:")


@pytest.mark.usefixtures("ingested")
def test_new_images_in_a_folder_run_only_the_new_shard(workdir: Path) -> None:
    folder = workdir / "data" / "folder"
    # Two more images whose names sort after the others: shard 000001 gains rows
    # (4 -> 6), shard 000000 keeps its rows and is not rerun.
    added = [folder / "zz1.jpg", folder / "zz2.jpg"]
    for path in added:
        shutil.copy(next(iter(sorted(folder.glob("*.jpg")))), path)
    try:
        dry = snakemake(workdir, "-n", *summaries())
    finally:
        for path in added:
            path.unlink()
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    # The table and COCO sources list their rows explicitly; only the folder grew.
    assert_only_ingest_of(output, "results/folder/shards/000001.tar")
