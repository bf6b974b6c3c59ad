"""Caption stage: a vision-language model describes every image of a shard.

Any transformers image-text-to-text model loads through ``AutoProcessor`` and
``AutoModelForImageTextToText``; the prompt goes through the processor's chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm import tqdm

from vlmflow.io import stable_seed, write_rows_parquet
from vlmflow.models import GenerationSettings
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
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings.generation_kwargs())
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def run(
    shard_tar: str | Path, out_parquet: str | Path, settings: CaptionSettings, shard_id: str
) -> dict[str, int]:
    """Caption every image of ``shard_tar``; one output row per input key."""
    samples = list(iter_samples(shard_tar))
    processor, model = load_vlm(settings)
    # One seed per shard: a shard's captions do not depend on which other shards exist.
    torch.manual_seed(stable_seed(settings.seed, "caption", shard_id))
    record = {
        "model": settings.model,
        "prompt_id": prompt_id(settings.prompt),
        "settings": json.dumps({k: v for k, v in asdict(settings).items() if k != "prompt"}),
    }
    rows: list[dict[str, Any]] = []
    counts = {"in": len(samples), "ok": 0, "failed": 0}
    batches = [
        samples[i : i + settings.batch_size] for i in range(0, len(samples), settings.batch_size)
    ]
    for batch in tqdm(batches, desc=f"caption {shard_id}", unit="batch"):
        try:
            captions = caption_batch(processor, model, batch, settings)
            failures: list[str | None] = [None] * len(batch)
        except (OSError, ValueError) as error:  # an undecodable image fails its batch only
            log.warning("batch starting at %s failed: %s", batch[0].key, error)
            captions = [""] * len(batch)
            failures = [f"caption_error: {error}"] * len(batch)
        for sample, caption, failure in zip(batch, captions, failures, strict=True):
            rows.append(
                {
                    "key": sample.key,
                    "web_caption": sample.web_caption,
                    "vlm_caption": caption,
                    "failure": failure,
                    **record,
                }
            )
            counts["failed" if failure else "ok"] += 1
    write_rows_parquet(out_parquet, rows, CAPTION_SCHEMA)
    log.info("shard %s: %s", shard_id, counts)
    return counts
