"""Reading WebDataset shards written by the ingest stage."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

# Image member extensions the ingest stage writes (ingest.encode_format).
IMAGE_EXTS = ("jpg", "webp")


@dataclass(frozen=True)
class Sample:
    key: str
    image_data: bytes  # encoded image, as stored in the tar
    image_ext: str  # its member extension: jpg or webp
    web_caption: str
    meta: dict[str, Any]

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.image_data)) as img:
            return img.convert("RGB")


def iter_samples(tar_path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard in their stored order."""
    dataset = wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False)
    records = iter(dataset)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except tarfile.ReadError as error:
            # A truncated or overwritten shard: say which file, not tarfile's internals.
            reason = str(error.args[0] if error.args else error).split(" @ ", 1)[0]
            raise ValueError(
                f"{tar_path}: damaged WebDataset shard ({reason}); "
                "delete it and rerun its ingest job"
            ) from error
        key = record["__key__"]
        image_ext = next((ext for ext in IMAGE_EXTS if ext in record), None)
        missing = [ext for ext in ("txt", "json") if ext not in record]
        if image_ext is None:
            missing.insert(0, " or ".join(IMAGE_EXTS))
        if missing:
            raise ValueError(f"{tar_path}: sample {key!r} lacks {', '.join(missing)}")
        assert image_ext is not None
        yield Sample(
            key=key,
            image_data=record[image_ext],
            image_ext=image_ext,
            web_caption=record["txt"].decode("utf-8"),
            meta=json.loads(record["json"]),
        )
