"""The index files through which per-dataset steps read a dataset's per-shard outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlmflow.core.contract import (
    INDEXES,
    SHARD_INDEX,
    ShardIndexError,
    read_shard_index,
    write_shard_index,
)


def touch_outputs(index: str, dataset: str, shards: list[str]) -> None:
    for shard in shards:
        for template in INDEXES[index].values():
            path = Path(template.format(dataset=dataset, shard=shard))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def test_an_index_lists_every_output_of_its_job_in_shard_order(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shards = ["000000", "000001", "000002"]
    touch_outputs("h5", "d", shards)
    out = SHARD_INDEX.format(dataset="d", index="h5")
    assert write_shard_index("h5", "d", shards, out) == 3
    assert read_shard_index(out, "h5_phase2") == [
        f"results/d/h5/phase2/{shard}.h5" for shard in shards
    ]
    assert read_shard_index(out, "h5_images") == [f"results/d/h5/images/{s}" for s in shards]
    # Several datasets' indexes (training reads every train dataset's): file by file.
    touch_outputs("h5", "e", ["000000"])
    other = SHARD_INDEX.format(dataset="e", index="h5")
    write_shard_index("h5", "e", ["000000"], other)
    assert read_shard_index([out, other], "h5") == [
        *(f"results/d/h5/shards/{s}.json" for s in shards),
        "results/e/h5/shards/000000.json",
    ]
    assert read_shard_index([], "h5") == []  # an eval dataset has no h5 index


def test_an_index_naming_a_missing_file_is_refused_and_not_written(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    touch_outputs("ingest", "d", ["000000", "000001"])
    os.remove("results/d/shards/000001.tar")
    out = SHARD_INDEX.format(dataset="d", index="ingest")
    with pytest.raises(ShardIndexError, match=r"shard 000001: results/d/shards/000001.tar"):
        write_shard_index("ingest", "d", ["000000", "000001"], out)
    assert not os.path.exists(out)


def test_reading_a_column_an_index_lacks_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    touch_outputs("captions", "d", ["000000"])
    out = SHARD_INDEX.format(dataset="d", index="captions")
    write_shard_index("captions", "d", ["000000"], out)
    with pytest.raises(ShardIndexError, match=r"captions.tsv: no column 'phase1'"):
        read_shard_index(out, "phase1")
