"""A procedurally drawn image set with known labels: coloured shapes on a plain ground.

Each image shows one filled shape (circle, square or triangle) in one colour, at a random
size and place; its labels are the colour and the shape, e.g. ``["red", "circle"]``. The
set is small and learnable by the tiny demo models in seconds, which makes it the
learning test's data (a trained model must name held-out images' shapes and colours
far better than an untrained one) and the loader benchmark's.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One ``shape`` in ``colour`` on a light grey ground, placed and sized by ``rng``."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    side = rng.randint(size * 2 // 5, size * 4 // 5)
    left = rng.randint(0, size - side)
    top = rng.randint(0, size - side)
    box = (left, top, left + side, top + side)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon(
            [(left, top + side), (left + side, top + side), (left + side // 2, top)], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    return image


def samples(count: int, seed: int, size: int = 64) -> list[tuple[str, Image.Image, list[str]]]:
    """``count`` (key, image, labels) triples; colours and shapes cycle so every pair
    appears, positions and sizes come from ``seed``."""
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    out = []
    for number in range(count):
        colour, shape = pairs[number % len(pairs)]
        key = f"s{seed}_{number:05d}"
        out.append((key, draw(shape, colour, rng, size), [colour, shape]))
    return out


def write_shard(path: str | Path, items: list[tuple[str, Image.Image, list[str]]]) -> None:
    """A WebDataset tar of the items, as the ingest stage writes shards (jpg, txt, json)."""
    import tarfile

    from vlmflow.stages.ingest import write_tar_sample

    with tarfile.open(path, "w") as tar:
        for key, image, labels in items:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sample = {
                "__key__": key,
                "jpg": buffer.getvalue(),
                "txt": f"a {' '.join(labels)}".encode(),
                "json": json.dumps({"key": key}).encode(),
            }
            write_tar_sample(tar, sample)


def write_attribute_tables(
    items: list[tuple[str, Image.Image, list[str]]],
    phase1_parquet: str | Path,
    phase2_parquet: str | Path,
) -> None:
    """Phase-1 and phase-2 attribute files with each item's known labels, as the
    attribute stages write them, so the h5 stage can pack the set."""
    from vlmflow.core.io import write_rows_parquet
    from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA

    common = {"model": "shapes", "prompt_id": "-", "settings": "{}", "failure": None}
    phase1 = [
        {
            **common,
            "key": key,
            "web_caption": f"a {' '.join(labels)}",
            "vlm_caption": "",
            "raw_answer": ", ".join(labels),
            "attributes": labels,
        }
        for key, _, labels in items
    ]
    phase2 = [
        {
            **common,
            "key": key,
            "raw_answer": "none",
            "phase1_attributes": labels,
            "phase2_attributes": [],
            "attributes": labels,
            "attribute_sources": ["phase1"] * len(labels),
            "phase2_failure": None,
        }
        for key, _, labels in items
    ]
    write_rows_parquet(phase1_parquet, phase1, PHASE1_SCHEMA)
    write_rows_parquet(phase2_parquet, phase2, PHASE2_SCHEMA)
