"""Reading WebDataset shards written by the ingest stage."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    web_caption: str
    meta: dict[str, Any]

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.jpg)) as img:
            return img.convert("RGB")


def iter_samples(tar_path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard in their stored order."""
    dataset = wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False)
    for record in dataset:
        key = record["__key__"]
        missing = [ext for ext in ("jpg", "txt", "json") if ext not in record]
        if missing:
            raise ValueError(f"{tar_path}: sample {key!r} lacks {', '.join(missing)}")
        yield Sample(
            key=key,
            jpg=record["jpg"],
            web_caption=record["txt"].decode("utf-8"),
            meta=json.loads(record["json"]),
        )
