"""Tests for the caption gallery and the dialog samples pages."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from vlmflow.core.io import write_rows_parquet
from vlmflow.core.shards import iter_samples
from vlmflow.reporting.inspect_samples import write_dialogs, write_gallery
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
from vlmflow.stages.caption import CAPTION_SCHEMA

KEYS = [f"k{n:03d}" for n in range(5)]


def caption_rows() -> list[dict[str, Any]]:
    return [
        {
            "key": key,
            "web_caption": f"web {key}",
            "vlm_caption": "" if key == "k001" else f"The image shows a <thing> {n}.",
            "model": "m",
            "prompt_id": "p",
            "settings": "{}",
            "failure": "caption_error: bad" if key == "k001" else None,
        }
        for n, key in enumerate(KEYS)
    ]


def phase_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    phase1, phase2 = [], []
    for n, key in enumerate(KEYS):
        failed = key == "k001"
        phase1.append(
            {
                "key": key,
                "web_caption": f"web {key}",
                "vlm_caption": f"The image shows a thing {n}.",
                "raw_answer": None if failed else f"1. thing {n}\n2. red box",
                "attributes": [] if failed else [f"thing {n}", "red box"],
                "model": "llm",
                "prompt_id": "p",
                "failure": "caption_failed" if failed else None,
            }
        )
        phase2.append(
            {
                "key": key,
                "raw_answer": None if failed else "box",
                "phase1_attributes": [] if failed else [f"thing {n}", "red box"],
                "phase2_attributes": [] if failed else ["box"],
                "attributes": [] if failed else ["box", f"thing {n}", "red box"],
                "attribute_sources": [] if failed else ["phase2", "phase1", "phase1"],
                "model": "llm",
                "prompt_id": "p",
                "failure": "caption_failed" if failed else None,
            }
        )
    return phase1, phase2


def test_gallery_shows_the_first_images_with_their_texts(shard_tar: Path, tmp_path: Path) -> None:
    write_rows_parquet(tmp_path / "c.parquet", caption_rows(), CAPTION_SCHEMA)
    _, phase2 = phase_rows()
    write_rows_parquet(tmp_path / "p2.parquet", phase2, PHASE2_SCHEMA)
    out = tmp_path / "report" / "gallery.html"
    assert (
        write_gallery(shard_tar, tmp_path / "c.parquet", tmp_path / "p2.parquet", out, 3, "g") == 3
    )
    page = out.read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/jpeg;base64,([^']+)'", page)
    first = [sample.image_data for sample in iter_samples(shard_tar)][:3]
    assert [base64.b64decode(data) for data in images] == first  # inlined, in shard order
    assert "a photo of a coloured square number 0" in page  # the shard's web caption
    assert "The image shows a &lt;thing&gt; 0." in page and "<thing>" not in page  # escaped
    assert "box, thing 0, red box" in page
    assert "caption_error: bad" in page
    assert "k003" not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_dialogs_rebuild_each_phase_prompt_and_show_the_parse(tmp_path: Path) -> None:
    phase1, phase2 = phase_rows()
    write_rows_parquet(tmp_path / "p1.parquet", phase1, PHASE1_SCHEMA)
    write_rows_parquet(tmp_path / "p2.parquet", phase2, PHASE2_SCHEMA)
    out = tmp_path / "dialogs.html"
    written = write_dialogs(
        tmp_path / "p1.parquet",
        tmp_path / "p2.parquet",
        "Caption: {web_caption} | VLM: {vlm_caption}",
        "Items:\n{attributes}\nAdd parts.",
        out,
        2,
        "d",
    )
    assert written == 4  # two per phase; k001 never reached the LLM
    page = out.read_text(encoding="utf-8")
    assert "Caption: web k000 | VLM: a thing 0." in page  # the cleaned VLM caption
    assert "Items:\n1. thing 2\n2. red box\nAdd parts." in page
    assert "k001" not in page and "k003" not in page
    assert page.count("<tr>") == 2 + 4  # two header rows, four dialogs
