"""Prompt texts and layouts shared by the stages that must agree on them.

The phase-2 training layout (h5) and the eval prompt (evaluate) must be identical,
otherwise the model is evaluated on a prompt it never saw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# LLaVA's ``vicuna_v1`` conversation style, as Cerebras ModelZoo's phase-2 files use it.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

LABEL_SEPARATOR = ", "


def phase2_prefix() -> str:
    """Text before the image patches."""
    return f"{VICUNA_V1_SYSTEM} USER: "


def phase2_prompt(instruction: str) -> str:
    """Text between the image patches and the answer."""
    return f"\n{instruction} ASSISTANT:"


def phase2_answer(labels: list[str]) -> str:
    return " " + LABEL_SEPARATOR.join(labels)


def prompt_id(text: str) -> str:
    """Short content hash recorded with every generated row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_prompt(path: str | Path) -> str:
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: prompt file is empty")
    return text
