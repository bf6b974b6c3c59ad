"""Caption stage: a vision-language model describes every image of a shard.

Any transformers image-text-to-text model loads through ``AutoProcessor`` and
``AutoModelForImageTextToText``; the prompt goes through the processor's chat template.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from vlmflow.io import write_rows_parquet
from vlmflow.models import GenerationSettings
from vlmflow.progress import ProgressFile, fingerprint, input_state, progress_path, run_batches
from vlmflow.prompts import prompt_id
from vlmflow.shards import Sample, iter_samples

log = logging.getLogger(__name__)

CAPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("web_caption", pa.string()),
        ("vlm_caption", pa.string()),
        ("model", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)


@dataclass(frozen=True)
class CaptionSettings(GenerationSettings):
    """Model, prompt and sampling settings of the caption stage."""

    # InternVL-Chat-V1.5's captioning settings as ROVI ran them.
    max_new_tokens: int = 168
    batch_size: int = 6
    # Tile budget for processors that cut images into tiles (InternVL's dynamic
    # resolution: up to max_tiles tiles plus a thumbnail); None keeps the model's own.
    max_tiles: int | None = None


def load_vlm(settings: CaptionSettings) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(
        settings.model, trust_remote_code=settings.trust_remote_code
    )
    model = settings.load_pretrained(AutoModelForImageTextToText)
    # Batched generation with a decoder-only LM needs the padding on the left.
    processor.tokenizer.padding_side = "left"
    return processor, model


def caption_batch(
    processor: Any, model: Any, samples: list[Sample], settings: CaptionSettings
) -> list[str]:
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(
        images=[sample.image() for sample in samples],
        text=[text] * len(samples),
        padding=True,
        return_tensors="pt",
        **tile_kwargs(processor, settings),
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings.generation_kwargs())
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def tile_kwargs(processor: Any, settings: CaptionSettings) -> dict[str, Any]:
    """The processor call's tile budget, for image processors that tile (InternVL)."""
    if settings.max_tiles is None:
        return {}
    if not getattr(processor.image_processor, "crop_to_patches", False):
        raise ValueError(
            f"caption.max_tiles is set but {type(processor.image_processor).__name__} does "
            "not cut images into tiles; unset it for this model"
        )
    return {"max_patches": settings.max_tiles}


def batch_order(samples: list[Sample]) -> list[int]:
    """Sample indices with images of similar shape and size next to each other.

    Tiling (InternVL) and native-resolution (Qwen2-VL) processors give an image as many
    tokens as its aspect ratio and size call for; batching alike images wastes less
    compute on padding. Sizes come from the ingest metadata, so no image is decoded.
    """

    def shape(index: int) -> tuple[int, int, int]:
        meta = samples[index].meta
        width, height = int(meta.get("width", 1)), int(meta.get("height", 1))
        return round(2 * math.log2(max(width, 1) / max(height, 1))), width * height, index

    return sorted(range(len(samples)), key=shape)


def run(
    shard_tar: str | Path, out_parquet: str | Path, settings: CaptionSettings, shard_id: str
) -> dict[str, int]:
    """Caption every image of ``shard_tar``; one output row per input key.

    Resumable: see vlmflow.progress. Raises ``Interrupted`` on SIGTERM (progress saved).
    """
    samples = list(iter_samples(shard_tar))
    keys = [sample.key for sample in samples]
    settings_json = json.dumps({k: v for k, v in asdict(settings).items() if k != "prompt"})
    record = {
        "model": settings.model,
        "prompt_id": prompt_id(settings.prompt),
        "settings": settings_json,
    }
    progress = ProgressFile(
        progress_path(out_parquet),
        fingerprint("caption", record, shard_id, input_state(shard_tar)),
    )
    processor = model = None
    if any(key not in progress.done for key in keys):
        # Loaded here, not inside a batch: a model that cannot load (or a setting it does
        # not take) is an error of the job, never a failure of the samples.
        processor, model = load_vlm(settings)
        tile_kwargs(processor, settings)

    def run_batch(indices: list[int]) -> list[dict[str, Any]]:
        batch = [samples[i] for i in indices]
        captions = caption_batch(processor, model, batch, settings)
        return [row(sample, caption, None) for sample, caption in zip(batch, captions, strict=True)]

    def failed_row(index: int, error: BaseException) -> dict[str, Any]:
        return row(samples[index], "", f"caption_error: {error}")

    def row(sample: Sample, caption: str, failure: str | None) -> dict[str, Any]:
        return {
            "key": sample.key,
            "web_caption": sample.web_caption,
            "vlm_caption": caption,
            "failure": failure,
            **record,
        }

    # One seed per batch, from the shard and the batch's first key: a shard's captions
    # depend neither on other shards nor on where an earlier attempt was stopped.
    done = run_batches(
        keys,
        settings.batch_size,
        run_batch,
        failed_row,
        progress,
        seed=(settings.seed, "caption", shard_id),
        desc=f"caption {shard_id}",
        order=batch_order(samples),
    )
    rows = [done[key] for key in keys]
    write_rows_parquet(out_parquet, rows, CAPTION_SCHEMA)
    progress.remove()
    failed = sum(1 for r in rows if r["failure"] is not None)
    counts = {"in": len(rows), "ok": len(rows) - failed, "failed": failed}
    log.info("shard %s: %s", shard_id, counts)
    return counts
