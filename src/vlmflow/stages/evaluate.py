"""Eval stage: the trained model lists labels for held-out images; R/P/F1@k.

The eval prompt is the phase-2 training layout (vicuna_v1 system prompt, USER:, image
patches, instruction, ASSISTANT:). Two decodings:

- ``greedy``: one answer per image, parsed as a list; its first k labels are the top k;
- ``one_shot`` (nxtp's): the k most likely first tokens in one step, each branch continued
  greedily to the next label delimiter (a comma, a newline or end of text), the labels
  ranked by the probability of their tokens.

Scores: soft R/P/F1 with a sentence encoder (vlmflow.core.metrics.soft_prf, as nxtp) and
strict exact-match R/P/F1 after lower-casing and singularising.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from vlmflow.core.attribute_text import parse_list
from vlmflow.core.io import atomic_open, read_parquet_rows, write_rows_parquet
from vlmflow.core.logs import progress_bar
from vlmflow.core.metrics import sentence_encoder, soft_prf, strict_prf
from vlmflow.core.models import device, num_image_tokens, pad_token_id
from vlmflow.core.prompts import phase2_layout, special_token_ids
from vlmflow.core.shards import Sample, iter_samples

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("raw_answer", pa.string()),
        ("predictions", pa.list_(pa.string())),
        # one_shot: the probability of each prediction's tokens; greedy: null.
        ("scores", pa.list_(pa.float64())),
        ("references", pa.list_(pa.string())),
    ]
)

METRIC_COLUMNS = [
    "dataset",
    "decoding",
    "k",
    "recall",
    "precision",
    "f1",
    "strict_recall",
    "strict_precision",
    "strict_f1",
    "n_images",
]
DECODINGS = ("greedy", "one_shot")


@dataclass(frozen=True)
class EvalSettings:
    instruction: str
    top_k: tuple[int, ...] = (10,)
    max_new_tokens: int = 64
    batch_size: int = 8
    decoding: str = "greedy"
    # one_shot: the longest label, in tokens.
    label_max_tokens: int = 8
    # The phase-2 layout the model was trained on (h5.phase2_style).
    phase2_style: str = "vicuna_v1"

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(
                f"eval decoding {self.decoding!r}: expected one of {', '.join(DECODINGS)}"
            )


@dataclass(frozen=True)
class RankedLabel:
    text: str
    logprob: float  # of all its tokens, first included
    tokens: tuple[int, ...]


def prompt_ids(model: Any, tokenizer: Any, instruction: str, style: str = "vicuna_v1") -> list[int]:
    """The phase-2 training layout up to the answer, patch slots as image tokens."""
    num_patches = num_image_tokens(model.config.vision_config)
    bos = tokenizer.bos_token_id
    layout = phase2_layout(tokenizer, instruction, [], style, bos, pad_token_id(tokenizer))
    return layout.prefix + [model.config.image_token_index] * num_patches + layout.prompt


def delimiter_ids(tokenizer: Any, model: Any) -> set[int]:
    """Tokens that end a label: any holding a comma or a newline, the stop ids, and every
    special token (the image token, padding, ...), which no label contains."""
    vocabulary = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ends = {i for i, text in enumerate(vocabulary) if "," in text or "\n" in text}
    stop = model.generation_config.eos_token_id
    ends |= set(stop if isinstance(stop, list) else [stop]) - {None}
    ends |= special_token_ids(tokenizer)
    ends.add(model.config.image_token_index)
    return ends


def one_shot(
    model: Any, processor: Any, samples: list[Sample], settings: EvalSettings
) -> list[list[RankedLabel]]:
    """nxtp's one-shot decoding: per image, the ``max(top_k)`` most likely first tokens
    (label ends excluded) in one forward pass; each branch continues greedily from a
    copy of the prompt's cache until a label delimiter; distinct labels by probability."""
    tokenizer = processor.tokenizer
    prompt = torch.tensor(
        [prompt_ids(model, tokenizer, settings.instruction, settings.phase2_style)],
        device=model.device,
    )
    ends = delimiter_ids(tokenizer, model)
    branches = max(settings.top_k)
    pad_id = pad_token_id(tokenizer)
    results = []
    for sample in progress_bar(samples, desc="eval one-shot", unit="image"):
        pixels = processor.image_processor(images=[sample.image()], return_tensors="pt")
        with torch.inference_mode():
            first = model(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                pixel_values=pixels["pixel_values"].to(model.device, model.dtype),
                use_cache=True,
            )
            logprobs = first.logits[0, -1].float().log_softmax(-1)
            logprobs[sorted(ends)] = -math.inf
            count = min(branches, int(torch.isfinite(logprobs).sum()))
            first_logprobs, first_tokens = logprobs.topk(count)
            cache = first.past_key_values
            cache.batch_repeat_interleave(count)
            branch_ids = torch.cat([prompt.repeat(count, 1), first_tokens[:, None]], dim=1)
            output = model.generate(
                input_ids=branch_ids,
                attention_mask=torch.ones_like(branch_ids),
                past_key_values=cache,
                max_new_tokens=settings.label_max_tokens - 1,
                do_sample=False,
                eos_token_id=sorted(ends),
                pad_token_id=pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        generated = output.sequences[:, branch_ids.shape[1] :].tolist()
        best: dict[str, RankedLabel] = {}
        for b in range(count):
            tokens = [int(first_tokens[b])]
            total = float(first_logprobs[b])
            for step, token in enumerate(generated[b]):
                if token in ends:
                    break
                total += float(output.logits[step][b].float().log_softmax(-1)[token])
                tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            key = " ".join(text.lower().split())
            if key and (key not in best or best[key].logprob < total):
                best[key] = RankedLabel(text, total, tuple(tokens))
        results.append(sorted(best.values(), key=lambda label: -label.logprob))
    return results


def predict(model: Any, processor: Any, samples: list[Sample], settings: EvalSettings) -> list[str]:
    """Greedy answers for a list of images, in the phase-2 training layout."""
    tokenizer = processor.tokenizer
    prompt = prompt_ids(model, tokenizer, settings.instruction, settings.phase2_style)
    pad_id = pad_token_id(tokenizer)
    answers: list[str] = []
    batches = range(0, len(samples), settings.batch_size)
    for start in progress_bar(batches, desc="eval", unit="batch"):
        batch = samples[start : start + settings.batch_size]
        input_ids = torch.tensor([prompt] * len(batch), device=model.device)
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
    left_out: Mapping[tuple[str, str], str] | None = None,
) -> list[dict[str, Any]]:
    """``left_out``: (shard, key) -> reason of images not to score (vlmflow.stages.duplicates: a
    leak from a train dataset, or a repeat of an earlier image). A shard is its tar's stem,
    and its reference labels are in the phase-2 file of the same stem: labels are looked
    up by (shard, key), so a key that comes again in another shard keeps its own."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    left_out = left_out or {}
    references = reference_labels(phase2_parquets)
    log.info("%s: left out %s", dataset, dict(Counter(left_out.values())) or "nothing")
    # Only images with reference labels can be scored; the rest are counted in the log.
    samples, labels = [], []
    for tar in shard_tars:
        for s in iter_samples(tar):
            where = (Path(tar).stem, s.key)
            if where in references and where not in left_out:
                samples.append(s)
                labels.append(references[where])
    log.info("%s: %d images with references", dataset, len(samples))
    if not samples:
        raise ValueError(f"eval dataset {dataset!r} has no image with reference attributes")
    model: Any = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model = model.to(device()).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    scores: list[list[float] | None]
    if settings.decoding == "one_shot":
        ranked = one_shot(model, processor, samples, settings)
        predictions = [[label.text for label in labels] for labels in ranked]
        answers = [", ".join(labels) for labels in predictions]
        scores = [[math.exp(label.logprob) for label in labels] for labels in ranked]
    else:
        answers = predict(model, processor, samples, settings)
        predictions = [parse_list(answer).attributes for answer in answers]
        scores = [None] * len(answers)
    rows = [
        {
            "key": s.key,
            "raw_answer": a,
            "predictions": p,
            "scores": c,
            "references": r,
        }
        for s, a, p, c, r in zip(samples, answers, predictions, scores, labels, strict=True)
    ]
    write_rows_parquet(out_predictions, rows, PREDICTION_SCHEMA)

    embed = sentence_encoder(similarity_encoder)
    table = []
    for k in settings.top_k:
        soft = soft_prf(labels, [p[:k] for p in predictions], embed)
        strict = strict_prf(labels, [p[:k] for p in predictions])
        table.append(
            {
                "dataset": dataset,
                "decoding": settings.decoding,
                "k": k,
                "recall": round(soft.recall, 4),
                "precision": round(soft.precision, 4),
                "f1": round(soft.f1, 4),
                "strict_recall": round(strict.recall, 4),
                "strict_precision": round(strict.precision, 4),
                "strict_f1": round(strict.f1, 4),
                "n_images": len(rows),
            }
        )
    write_metrics_tsv(out_metrics, table)
    return table


def reference_labels(phase2_parquets: Sequence[str | Path]) -> dict[tuple[str, str], list[str]]:
    """(shard, key) -> the sample's phase-2 attributes, where it has any."""
    references = {}
    for path in phase2_parquets:
        for row in read_parquet_rows(path):
            if row["failure"] is None and row["attributes"]:
                references[Path(path).stem, row["key"]] = list(row["attributes"])
    return references


def write_metrics_tsv(path: str | Path, table: list[dict[str, Any]]) -> None:
    with atomic_open(path) as handle:
        handle.write("\t".join(METRIC_COLUMNS) + "\n")
        for row in table:
            handle.write("\t".join(str(row[c]) for c in METRIC_COLUMNS) + "\n")
