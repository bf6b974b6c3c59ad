"""Reading WebDataset shards back."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from vlmflow.core.shards import iter_samples
from vlmflow.stages.ingest import write_tar_sample


def _shard(path: Path, count: int) -> None:
    with tarfile.open(path, "w") as tar:
        for number in range(count):
            write_tar_sample(
                tar,
                {
                    "__key__": f"k{number}",
                    "jpg": bytes(range(256)) * 40,
                    "txt": f"caption {number}".encode(),
                    "json": json.dumps({"key": f"k{number}"}).encode(),
                },
            )


def test_samples_come_back_in_order(tmp_path: Path) -> None:
    _shard(tmp_path / "000000.tar", 3)
    samples = list(iter_samples(tmp_path / "000000.tar"))
    assert [s.key for s in samples] == ["k0", "k1", "k2"]
    assert samples[1].web_caption == "caption 1" and samples[1].meta == {"key": "k1"}


def test_a_truncated_shard_is_named_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "000000.tar"
    _shard(path, 3)
    path.write_bytes(path.read_bytes()[:15000])
    with pytest.raises(ValueError) as caught:
        list(iter_samples(path))
    assert str(caught.value) == (
        f"{path}: damaged WebDataset shard (unexpected end of data); "
        "delete it and rerun its ingest job"
    )
