"""The attribute stages' settings (config.attributes.phaseN) and the columns of their
outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from vlmflow.core import constrained
from vlmflow.core.models import GenerationSettings

PHASE1_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("web_caption", pa.string()),
        ("vlm_caption", pa.string()),
        ("raw_answer", pa.string()),
        ("attributes", pa.list_(pa.string())),
        ("model", pa.string()),
        # The backend that generated the row and its version: "transformers 5.23.0",
        # "vllm 0.32.0"; None where nothing was generated.
        ("engine", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)

PHASE2_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("raw_answer", pa.string()),
        ("phase1_attributes", pa.list_(pa.string())),
        ("phase2_attributes", pa.list_(pa.string())),
        ("attributes", pa.list_(pa.string())),
        ("attribute_sources", pa.list_(pa.string())),
        # Why phase 2 added nothing to a kept sample (generation_error, refused, ...).
        ("phase2_failure", pa.string()),
        ("model", pa.string()),
        # The backend that generated the row and its version: "transformers 5.23.0",
        # "vllm 0.32.0"; None where nothing was generated.
        ("engine", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)


@dataclass(frozen=True)
class LLMSettings(GenerationSettings):
    """Generation settings of an attribute phase, plus how its answers are parsed."""

    stop_words: tuple[str, ...] = field(default_factory=tuple)
    max_words: int = 6
    # Prompt + answer tokens at most (Meta's reference code: max_seq_len); None: the
    # model's own context. A prompt that leaves no room for max_new_tokens fails as
    # "prompt_too_long" without being generated.
    max_seq_len: int | None = None
    # "text": free answers, parsed; "json": answers constrained to a JSON array of at most
    # max_items strings of at most max_item_chars characters (vlmflow.core.constrained).
    format: str = "text"
    max_items: int = 32
    max_item_chars: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in constrained.FORMATS:
            raise ValueError(f"format {self.format!r}: expected one of {constrained.FORMATS}")

    def list_shape(self, phase: str) -> constrained.ListShape | None:
        """The bounds answers are constrained to; None in text mode."""
        if self.format != "json":
            return None
        return constrained.phase_shape(phase, self.max_items, self.max_item_chars)

    def recorded(self) -> dict[str, Any]:
        """The settings rows and progress files record (the prompt has its prompt_id); a
        text-mode phase records no json-mode keys, as before json mode existed."""
        hidden = {"prompt", *constrained.JSON_KEYS} if self.format == "text" else {"prompt"}
        return {k: v for k, v in asdict(self).items() if k not in hidden}
