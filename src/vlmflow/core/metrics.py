"""Soft recall / precision / F1 of predicted labels, as nxtp reports them, and a strict
variant that counts exact matches after lower-casing and singularising.

Every label is encoded alone with a sentence encoder (all-MiniLM-L6-v2, mean-pooled over
the attention mask, L2-normalised). For one image, S is the references x predictions
cosine matrix: R is the mean over references of the row maximum, P the mean over
predictions of the column maximum, and F1 = 2RP / (R + P) (0 when R + P = 0). Scores are
averaged over images; F1 is the mean of per-image F1s, not the F1 of the means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmflow.core.models import pretrained

Embed = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Scores:
    recall: float
    precision: float
    f1: float


def image_scores(references: torch.Tensor, predictions: torch.Tensor) -> Scores:
    """Scores of one image from L2-normalised embeddings (rows are labels)."""
    similarity = references @ predictions.T
    recall = float(similarity.max(dim=1).values.mean())
    precision = float(similarity.max(dim=0).values.mean())
    total = recall + precision
    f1 = 2 * recall * precision / total if total > 0 else 0.0
    return Scores(recall, precision, f1)


def soft_prf(
    references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]], embed: Embed
) -> Scores:
    """Mean soft R/P/F1 over images; an image with no prediction predicts [""] (as nxtp)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference lists but {len(predictions)} predictions")
    if not references:
        raise ValueError("no images to score")
    vocabulary = sorted(
        {label for labels in (*references, *predictions) for label in labels} | {""}
    )
    vectors = embed(vocabulary)
    row_of = {label: i for i, label in enumerate(vocabulary)}
    per_image = []
    for refs, preds in zip(references, predictions, strict=True):
        if not refs:
            raise ValueError("every scored image needs at least one reference label")
        preds = list(preds) or [""]
        per_image.append(
            image_scores(vectors[[row_of[r] for r in refs]], vectors[[row_of[p] for p in preds]])
        )
    n = len(per_image)
    return Scores(
        recall=sum(s.recall for s in per_image) / n,
        precision=sum(s.precision for s in per_image) / n,
        f1=sum(s.f1 for s in per_image) / n,
    )


def sentence_encoder(model_path: str, batch_size: int = 64) -> Embed:
    """all-MiniLM-L6-v2-style encoder: mean pooling over the attention mask, L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(**pretrained(model_path))
    model = AutoModel.from_pretrained(**pretrained(model_path)).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(chunks) if chunks else torch.zeros(0, 1)

    return embed


def strict_label(label: str) -> str:
    """A label as the strict metric compares it: lower-case, single spaces, singular."""
    from vlmflow.core.attribute_text import singularize

    return singularize(" ".join(label.lower().split()))


def strict_prf(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> Scores:
    """Mean exact-match R/P/F1 over images after ``strict_label``: R = matched references
    / references, P = matched predictions / predictions (0 with no prediction)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference lists but {len(predictions)} predictions")
    if not references:
        raise ValueError("no images to score")
    recall = precision = f1 = 0.0
    for refs, preds in zip(references, predictions, strict=True):
        if not refs:
            raise ValueError("every scored image needs at least one reference label")
        wanted = {strict_label(r) for r in refs}
        given = {strict_label(p) for p in preds}
        hits = len(wanted & given)
        r = hits / len(wanted)
        p = hits / len(given) if given else 0.0
        recall += r
        precision += p
        f1 += 2 * r * p / (r + p) if r + p > 0 else 0.0
    n = len(references)
    return Scores(recall / n, precision / n, f1 / n)
