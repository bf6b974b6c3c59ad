"""Tests for the caption stage with the tiny demo VLM."""

from __future__ import annotations

import io
import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmflow.core.progress import Interrupted, ProgressFile, progress_path
from vlmflow.core.prompts import prompt_id
from vlmflow.core.shards import Sample, iter_samples
from vlmflow.stages import caption
from vlmflow.stages.caption import CAPTION_SCHEMA, CaptionSettings

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
    monkeypatch.setattr("vlmflow.core.io.pq.write_table", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        caption.run(shard_tar, folder / "000000.parquet", settings, "000000")
    # No half-written output; only the progress side file, which the rerun resumes from.
    assert [p.name for p in folder.iterdir()] == ["000000.parquet.progress.jsonl"]


def test_a_failing_batch_is_retried_in_halves_until_only_the_bad_sample_fails(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = caption.caption_batch

    sizes: list[int] = []

    def flaky(processor: Any, model: Any, samples: list[Sample], settings: Any) -> list[str]:
        sizes.append(len(samples))
        if any(sample.key == "k002" for sample in samples):
            raise OSError("cannot identify image file")
        return real(processor, model, samples, settings)

    monkeypatch.setattr(caption, "caption_batch", flaky)
    out = tmp_path / "000000.parquet"
    counts = caption.run(shard_tar, out, settings, "000000")
    assert counts == {"in": 5, "ok": 4, "failed": 1}
    # Batches of 2: [k000 k001] ok, [k002 k003] fails, then [k002] fails, [k003] ok, [k004].
    assert sizes == [2, 2, 1, 1, 1]
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == KEYS
    failed = {r["key"]: r for r in rows if r["failure"] is not None}
    assert set(failed) == {"k002"}
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


def test_sigterm_mid_shard_then_restart_matches_an_uninterrupted_run(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    caption.run(shard_tar, tmp_path / "full.parquet", settings, "000000")
    real = caption.caption_batch
    batches: list[list[str]] = []

    def stopped_in_second_batch(processor: Any, model: Any, samples: list[Sample], s: Any) -> Any:
        batches.append([sample.key for sample in samples])
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # Slurm's warning before the time limit
        return real(processor, model, samples, s)

    monkeypatch.setattr(caption, "caption_batch", stopped_in_second_batch)
    out = tmp_path / "out" / "000000.parquet"
    with pytest.raises(Interrupted):
        caption.run(shard_tar, out, settings, "000000")
    assert not out.exists()
    assert progress_path(out).exists()

    real_counting = Counting(real)
    monkeypatch.setattr(caption, "caption_batch", real_counting)
    caption.run(shard_tar, out, settings, "000000")
    # Batches of 2 over 5 keys: the first was kept; the interrupted one and the last ran.
    assert real_counting.batches == [["k002", "k003"], ["k004"]]
    assert pq.read_table(out).to_pylist() == pq.read_table(tmp_path / "full.parquet").to_pylist()
    assert not progress_path(out).exists()


def test_progress_of_other_settings_is_not_reused(
    shard_tar: Path, tmp_path: Path, settings: CaptionSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "000000.parquet"
    progress = ProgressFile(progress_path(out), "settings of an earlier config")
    progress.add([{"key": "k000", "vlm_caption": "stale"}])
    progress.flush()
    counting = Counting(caption.caption_batch)
    monkeypatch.setattr(caption, "caption_batch", counting)
    caption.run(shard_tar, out, settings, "000000")
    assert len(counting.batches) == 3
    assert "stale" not in pq.read_table(out).column("vlm_caption").to_pylist()


class Counting:
    """Wraps caption_batch and records the keys of every batch it is called with."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.batches: list[list[str]] = []

    def __call__(self, processor: Any, model: Any, samples: list[Sample], s: Any) -> Any:
        self.batches.append([sample.key for sample in samples])
        return self.real(processor, model, samples, s)


# ---------------------------------------------------------------------------
# VLM families: LLaVA, InternVL, Qwen2-VL, all through AutoProcessor +
# AutoModelForImageTextToText and their own chat templates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vlm", "internvl", "qwenvl"])
def test_each_vlm_family_captions_a_shard(
    kind: str, demo_models: dict[str, str], shard_tar: Path, tmp_path: Path
) -> None:
    settings = CaptionSettings(model=demo_models[kind], prompt=PROMPT, max_new_tokens=6)
    _, model = caption.load_vlm(settings)
    assert (
        type(model).__name__
        == {
            "vlm": "LlavaForConditionalGeneration",
            "internvl": "InternVLForConditionalGeneration",
            "qwenvl": "Qwen2VLForConditionalGeneration",
        }[kind]
    )
    out = tmp_path / "captions.parquet"
    assert caption.run(shard_tar, out, settings, "000000") == {"in": 5, "ok": 5, "failed": 0}
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == KEYS
    assert all(isinstance(r["vlm_caption"], str) and r["failure"] is None for r in rows)


def image_rows(demo_models: dict[str, str], max_tiles: int | None, size: tuple[int, int]) -> int:
    """How many image tiles the processor gives one image under a tile budget."""
    settings = CaptionSettings(
        model=demo_models["internvl"], prompt=PROMPT, max_new_tokens=2, max_tiles=max_tiles
    )
    processor, model = caption.load_vlm(settings)
    seen: dict[str, Any] = {}
    real = model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(**kwargs)

    model.generate = spy
    image = Image.new("RGB", size, (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    sample = Sample("k", buffer.getvalue(), "jpg", "", {})
    caption.caption_batch(processor, model, [sample], settings)
    return int(seen["pixel_values"].shape[0])


def test_tile_budget_is_respected(demo_models: dict[str, str]) -> None:
    # A 6:1 panorama: InternVL's dynamic resolution tiles it along its aspect ratio;
    # each budget caps the tiles (plus one thumbnail once there is more than one tile).
    wide = (192, 32)
    counts = {tiles: image_rows(demo_models, tiles, wide) for tiles in (1, 2, 4, 6)}
    assert counts == {1: 1, 2: 3, 4: 5, 6: 7}
    assert image_rows(demo_models, None, wide) == counts[6]  # the model's default: 6


def test_tile_budget_on_a_model_without_tiles_is_a_config_error(
    demo_models: dict[str, str], shard_tar: Path, tmp_path: Path
) -> None:
    settings = CaptionSettings(model=demo_models["vlm"], prompt=PROMPT, max_tiles=4)
    with pytest.raises(ValueError, match=r"caption\.max_tiles is set but CLIPImageProcessor"):
        caption.run(shard_tar, tmp_path / "out.parquet", settings, "000000")
    assert not (tmp_path / "out.parquet").exists()


def test_attention_kernel_comes_from_the_settings(demo_models: dict[str, str]) -> None:
    settings = CaptionSettings(model=demo_models["vlm"], prompt=PROMPT, attn_implementation="eager")
    _, model = caption.load_vlm(settings)
    assert model.config._attn_implementation == "eager"
    _, default = caption.load_vlm(replace(settings, attn_implementation=None))
    assert default.config._attn_implementation == "sdpa"


def test_device_map_auto_places_the_model_and_captions(
    demo_models: dict[str, str], shard_tar: Path, tmp_path: Path
) -> None:
    settings = CaptionSettings(
        model=demo_models["vlm"], prompt=PROMPT, max_new_tokens=4, device_map="auto"
    )
    _, model = caption.load_vlm(settings)
    # accelerate placed it (on this machine: all on the CPU, the only device).
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    out = tmp_path / "captions.parquet"
    assert caption.run(shard_tar, out, settings, "000000")["ok"] == 5
