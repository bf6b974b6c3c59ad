"""Tests for the caption stage with the tiny demo VLM."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from vlmflow import caption
from vlmflow.caption import CAPTION_SCHEMA, CaptionSettings
from vlmflow.prompts import prompt_id
from vlmflow.shards import Sample, iter_samples

PROMPT = "Describe this image in two plain sentences."
KEYS = [f"k{n:03d}" for n in range(5)]


@pytest.fixture
def settings(demo_models: dict[str, str]) -> CaptionSettings:
    # A batch size that does not divide the shard exercises the short last batch.
    return CaptionSettings(model=demo_models["vlm"], prompt=PROMPT, max_new_tokens=8, batch_size=2)


def test_one_row_per_key_in_order_with_provenance(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings
) -> None:
    out = tmp_path / "captions" / "000000.parquet"
    counts = caption.run(shard_tar, out, settings, "000000")

    assert counts == {"in": 5, "ok": 5, "failed": 0}
    table = pq.read_table(out)
    assert table.schema.equals(CAPTION_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == KEYS
    web = {s.key: s.web_caption for s in iter_samples(shard_tar)}
    for row in rows:
        assert row["web_caption"] == web[row["key"]]
        assert row["failure"] is None
        assert isinstance(row["vlm_caption"], str)
        assert row["vlm_caption"] == row["vlm_caption"].strip()
        # Only the newly generated tokens are decoded, never the prompt.
        assert "Describe" not in row["vlm_caption"]
        assert "assistant" not in row["vlm_caption"]
        assert row["model"] == settings.model
        assert row["prompt_id"] == prompt_id(PROMPT)
        recorded = json.loads(row["settings"])
        assert "prompt" not in recorded  # the prompt is identified by prompt_id
        assert recorded["max_new_tokens"] == 8
        assert recorded["batch_size"] == 2
        assert recorded["do_sample"] is True
        assert recorded["seed"] == 0
    # Sampling from a random model: the captions are not all the same text.
    assert len({r["vlm_caption"] for r in rows}) > 1


def test_same_settings_and_shard_give_identical_captions(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings
) -> None:
    caption.run(shard_tar, tmp_path / "a.parquet", settings, "000000")
    caption.run(shard_tar, tmp_path / "b.parquet", settings, "000000")
    caption.run(shard_tar, tmp_path / "c.parquet", replace(settings, seed=1), "000000")
    first = pq.read_table(tmp_path / "a.parquet").column("vlm_caption").to_pylist()
    again = pq.read_table(tmp_path / "b.parquet").column("vlm_caption").to_pylist()
    other_seed = pq.read_table(tmp_path / "c.parquet").column("vlm_caption").to_pylist()
    assert first == again
    assert first != other_seed


def test_output_is_written_atomically(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings
) -> None:
    folder = tmp_path / "out"
    caption.run(shard_tar, folder / "000000.parquet", settings, "000000")
    assert [p.name for p in folder.iterdir()] == ["000000.parquet"]


def test_failed_run_leaves_no_output(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()

    def broken_write(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(caption, "caption_batch", lambda p, m, samples, s: ["x"] * len(samples))
    monkeypatch.setattr("vlmflow.io.pq.write_table", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        caption.run(shard_tar, folder / "000000.parquet", settings, "000000")
    assert list(folder.iterdir()) == []


def test_a_failing_batch_fails_only_its_own_rows(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = caption.caption_batch

    def flaky(processor: Any, model: Any, samples: list[Sample], settings: Any) -> list[str]:
        if samples[0].key == "k002":
            raise OSError("cannot identify image file")
        return real(processor, model, samples, settings)

    monkeypatch.setattr(caption, "caption_batch", flaky)
    out = tmp_path / "000000.parquet"
    counts = caption.run(shard_tar, out, settings, "000000")
    assert counts == {"in": 5, "ok": 3, "failed": 2}
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == KEYS
    failed = {r["key"]: r for r in rows if r["failure"] is not None}
    assert set(failed) == {"k002", "k003"}
    assert all(r["failure"].startswith("caption_error:") for r in failed.values())
    assert all(r["vlm_caption"] == "" for r in failed.values())


def test_greedy_settings_drop_sampling_parameters() -> None:
    greedy = CaptionSettings(model="m", prompt="p", do_sample=False, max_new_tokens=5)
    assert greedy.generation_kwargs() == {"max_new_tokens": 5, "do_sample": False}
    sampled = CaptionSettings(model="m", prompt="p", temperature=0.3, top_p=0.9)
    assert sampled.generation_kwargs() == {
        "max_new_tokens": 168,
        "do_sample": True,
        "temperature": 0.3,
        "top_p": 0.9,
    }
