"""Duplicates across shards and eval images leaked from train datasets
(vlmflow.stages.duplicates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.test_ingest import ingest_list, save, write_list
from vlmflow.core.contract import DuplicatesError, read_duplicates, write_duplicates
from vlmflow.stages.duplicates import find_duplicates
from vlmflow.stages.ingest import IngestSettings

SETTINGS = IngestSettings(image_size=64, allow_local_files=True)


def ingest(folder: Path, name: str, rows: list[dict[str, str]]) -> Path:
    """One shard of these rows; its stats json, named as the workflow names it."""
    out = folder / name
    out.mkdir(parents=True)
    url_list = write_list(out / "list.tsv", rows)
    stats = out / f"{name}.stats.json"
    ingest_list(url_list, 0, len(rows), SETTINGS, out / f"{name}.tar", stats, name)
    return stats


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = {}
    for name, color in {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}.items():
        image = Image.new("RGB", (80, 60), color)
        image.paste((255, 255, 255), (10, 10, 30, 30))
        paths[name] = save(image, folder / f"{name}.png")
    # The same picture under another name (another URL): the same bytes once re-encoded.
    paths["red_copy"] = folder / "red_copy.png"
    shutil.copy(paths["red"], paths["red_copy"])
    return paths


def test_repeats_across_shards_are_found_by_url_and_by_image(
    tmp_path: Path, pictures: dict[str, Path]
) -> None:
    first = ingest(
        tmp_path,
        "000000",
        [
            {"url": pictures["red"].as_uri(), "caption": "red"},
            {"url": pictures["green"].as_uri(), "caption": "green"},
        ],
    )
    second = ingest(
        tmp_path,
        "000001",
        [
            {"url": pictures["green"].as_uri(), "caption": "green again: same URL"},
            {"url": pictures["red_copy"].as_uri(), "caption": "red under another URL"},
            {"url": pictures["blue"].as_uri(), "caption": "new"},
        ],
    )
    rows = find_duplicates([first, second])
    assert [(row["shard"], row["reason"]) for row in rows] == [
        ("000001", "duplicate"),
        ("000001", "duplicate"),
    ]
    assert rows[0]["detail"].startswith("same URL as ")
    assert rows[1]["detail"].startswith("same image as ")
    # The first of each stays: the same URL has the same key (a hash of the URL) in both
    # shards, and only the later one is marked.
    stats = json.loads(first.read_text())
    assert rows[0]["key"] in [key for key, _, _ in stats["images"]]
    out = tmp_path / "duplicates.tsv"
    write_duplicates(rows, out)
    assert read_duplicates(out) == {
        ("000001", rows[0]["key"]): "duplicate",
        ("000001", rows[1]["key"]): "duplicate",
    }


def test_eval_images_found_in_a_train_dataset_are_leaks(
    tmp_path: Path, pictures: dict[str, Path]
) -> None:
    train = ingest(tmp_path / "train", "000000", [{"url": pictures["red"].as_uri(), "caption": ""}])
    held_out = ingest(
        tmp_path / "eval",
        "000000",
        [
            {"url": pictures["red_copy"].as_uri(), "caption": "the train image, elsewhere"},
            {"url": pictures["blue"].as_uri(), "caption": "new"},
            {"url": pictures["blue"].as_uri() + "?again", "caption": "not a URL of the list"},
        ],
    )
    rows = find_duplicates([held_out], [train])
    assert [row["reason"] for row in rows] == ["leak", "duplicate"]
    assert "of train image" in rows[0]["detail"]
    out = tmp_path / "duplicates.tsv"
    write_duplicates(rows, out)
    assert read_duplicates(out) == {(row["shard"], row["key"]): row["reason"] for row in rows}


def test_stats_written_before_the_digests_are_read_from_the_tar(
    tmp_path: Path, pictures: dict[str, Path]
) -> None:
    first = ingest(tmp_path, "000000", [{"url": pictures["red"].as_uri(), "caption": ""}])
    second = ingest(tmp_path, "000001", [{"url": pictures["red_copy"].as_uri(), "caption": ""}])
    expected = find_duplicates([first, second])
    for stats_path in (first, second):
        stats = json.loads(stats_path.read_text())
        del stats["images"]
        stats_path.write_text(json.dumps(stats))
    assert find_duplicates([first, second]) == expected != []


def test_bad_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "000000.stats.json"
    broken.write_text(json.dumps({"shard": "000000", "images": [["only a key"]]}))
    with pytest.raises(DuplicatesError, match=r"000000.stats.json: field images"):
        find_duplicates([broken])
    table = tmp_path / "duplicates.tsv"
    table.write_text("key\tshard\treason\tdetail\nk\t000000\tsimilar\t\n")
    with pytest.raises(DuplicatesError, match=r"duplicates.tsv: line 2"):
        read_duplicates(table)
