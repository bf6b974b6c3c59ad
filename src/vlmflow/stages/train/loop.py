"""One training step's pieces: a batch as model inputs, the masked loss, seeds, and the
stop signal every rank sees."""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmflow.core.h5_layout import (
    INPUT_IDS,
    KEY_PADDING_MASK,
    LABELS,
    LOSS_MASK,
)
from vlmflow.stages.train.loader import H5Source


def model_inputs(
    rows: torch.Tensor, pad_id: int, image_token_id: int, num_patches: int
) -> dict[str, torch.Tensor]:
    """Turn packed H5 rows into model inputs.

    The patch slots hold the pad id; as in Cerebras' reader, the first pad of a row marks
    where the patches start. They become image tokens, which transformers' LLaVA replaces
    by projected vision features.
    """
    input_ids = rows[:, INPUT_IDS].clone()
    starts = (input_ids == pad_id).int().argmax(dim=1)
    positions = torch.arange(num_patches)
    for b, start in enumerate(starts.tolist()):
        input_ids[b, start + positions] = image_token_id
    return {
        "input_ids": input_ids,
        "attention_mask": 1 - rows[:, KEY_PADDING_MASK],
        "labels": rows[:, LABELS],
        "loss_mask": rows[:, LOSS_MASK],
    }


def masked_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over positions whose loss mask is 1 (labels are pre-shifted)."""
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def sigterm_flag() -> tuple[list[bool], Any]:
    """A flag SIGTERM sets (Slurm's warning before the time limit, scancel), and the
    previous handler; training saves a checkpoint at the next step and stops."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        previous = None
    return flag, previous


def any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def source_state(sources: list[H5Source]) -> list[Any]:
    return [[str(s.path), s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources]
