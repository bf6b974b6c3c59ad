"""Shared fixtures: tiny models built once per test session, small image shards."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
import yaml
from PIL import Image

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny demo models (every DEMO_BUILDERS kind), saved with save_pretrained."""
    return build_demo_models(tmp_path_factory.mktemp("models"))


def build_demo_models(root: Path) -> dict[str, str]:
    """Every DEMO_BUILDERS kind under ``root``, as the demo_model rule builds it."""
    from vlmflow.demo.demo_models import DEMO_BUILDERS

    folders = {}
    for kind, build in DEMO_BUILDERS.items():
        folder = root / f"demo-{kind}"
        build(folder, 0, **demo_model_settings(kind))
        folders[kind] = str(folder)
    return folders


def demo_model_settings(kind: str) -> dict[str, Any]:
    """The schema's demo_models defaults a builder takes, as the demo_model rule passes
    them (the workflow and the tests build the same models)."""
    from vlmflow.demo.demo_models import DEMO_OPTIONS

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    options = schema["properties"]["demo_models"]["properties"]
    return {key: options[key]["default"] for key in DEMO_OPTIONS[kind]}


def make_image(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shard_tar(tmp_path: Path) -> Path:
    """A WebDataset shard in the ingest stage's layout with five small images."""
    path = tmp_path / "000000.tar"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (90, 90, 90)]
    with wds.TarWriter(str(path)) as writer:
        for number, colour in enumerate(colours):
            key = f"k{number:03d}"
            writer.write(
                {
                    "__key__": key,
                    "jpg": make_image(40 + 7 * number, 30, colour),
                    "txt": f"a photo of a coloured square number {number}",
                    "json": json.dumps({"key": key, "url": f"file:///x/{key}.jpg"}),
                }
            )
    return path
