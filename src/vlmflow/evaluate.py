"""Eval stage: the trained model lists labels for held-out images; soft R/P/F1@k.

The eval prompt is the phase-2 training layout (vicuna_v1 system prompt, USER:, image
patches, instruction, ASSISTANT:), decoded greedily; the answer is parsed as a list and
its first k labels are the top-k predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm import tqdm

from vlmflow.attribute_text import parse_list
from vlmflow.io import atomic_open, read_parquet_rows, write_rows_parquet
from vlmflow.metrics import sentence_encoder, soft_prf
from vlmflow.models import device, num_image_tokens, pad_token_id
from vlmflow.prompts import phase2_prefix, phase2_prompt
from vlmflow.shards import Sample, iter_samples

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("raw_answer", pa.string()),
        ("predictions", pa.list_(pa.string())),
        ("references", pa.list_(pa.string())),
    ]
)

METRIC_COLUMNS = ["dataset", "k", "recall", "precision", "f1", "n_images"]


@dataclass(frozen=True)
class EvalSettings:
    instruction: str
    top_k: tuple[int, ...] = (10,)
    max_new_tokens: int = 64
    batch_size: int = 8


def predict(model: Any, processor: Any, samples: list[Sample], settings: EvalSettings) -> list[str]:
    """Greedy answers for a list of images, in the phase-2 training layout."""
    tokenizer = processor.tokenizer
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    num_patches = num_image_tokens(model.config.vision_config)
    prompt_ids = (
        [tokenizer.bos_token_id, *encode(phase2_prefix())]
        + [model.config.image_token_index] * num_patches
        + encode(phase2_prompt(settings.instruction))
    )
    pad_id = pad_token_id(tokenizer)
    answers: list[str] = []
    batches = range(0, len(samples), settings.batch_size)
    for start in tqdm(batches, desc="eval", unit="batch"):
        batch = samples[start : start + settings.batch_size]
        input_ids = torch.tensor([prompt_ids] * len(batch), device=model.device)
        pixels = processor.image_processor(images=[s.image() for s in batch], return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixels["pixel_values"].to(model.device, model.dtype),
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        answers += [
            t.strip()
            for t in tokenizer.batch_decode(
                output[:, input_ids.shape[1] :], skip_special_tokens=True
            )
        ]
    return answers


def run(
    model_dir: str,
    shard_tars: Sequence[str | Path],
    phase2_parquets: Sequence[str | Path],
    similarity_encoder: str,
    settings: EvalSettings,
    dataset: str,
    out_predictions: str | Path,
    out_metrics: str | Path,
) -> list[dict[str, Any]]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    references: dict[str, list[str]] = {}
    for path in phase2_parquets:
        for row in read_parquet_rows(path):
            if row["failure"] is None and row["attributes"]:
                references[row["key"]] = list(row["attributes"])
    # Only images with reference labels can be scored; the rest are counted in the log.
    samples = [s for tar in shard_tars for s in iter_samples(tar) if s.key in references]
    log.info("%s: %d images with references", dataset, len(samples))
    if not samples:
        raise ValueError(f"eval dataset {dataset!r} has no image with reference attributes")
    model: Any = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model = model.to(device()).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    answers = predict(model, processor, samples, settings)
    predictions = [parse_list(answer).attributes for answer in answers]
    rows = [
        {"key": s.key, "raw_answer": a, "predictions": p, "references": references[s.key]}
        for s, a, p in zip(samples, answers, predictions, strict=True)
    ]
    write_rows_parquet(out_predictions, rows, PREDICTION_SCHEMA)

    embed = sentence_encoder(similarity_encoder)
    table = []
    for k in settings.top_k:
        scores = soft_prf([r["references"] for r in rows], [p[:k] for p in predictions], embed)
        table.append(
            {
                "dataset": dataset,
                "k": k,
                "recall": round(scores.recall, 4),
                "precision": round(scores.precision, 4),
                "f1": round(scores.f1, 4),
                "n_images": len(rows),
            }
        )
    write_metrics_tsv(out_metrics, table)
    return table


def write_metrics_tsv(path: str | Path, table: list[dict[str, Any]]) -> None:
    with atomic_open(path) as handle:
        handle.write("\t".join(METRIC_COLUMNS) + "\n")
        for row in table:
            handle.write("\t".join(str(row[c]) for c in METRIC_COLUMNS) + "\n")
