"""What the exports share: the samples left out, the provenance columns, the counts a
card reports and the card's facts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.core.contract import (
    Funnel,
)

# (shard, key) -> why the sample is left out of the exports (vlmflow.stages.duplicates).
LeftOut = Mapping[tuple[str, str], str]
# What each generated row records of how it was made.
PROVENANCE = ("model", "engine", "prompt_id")


class ExportError(ValueError):
    """A stage output an export cannot use: the message names the file, key or field."""


@dataclass
class ExportCounts:
    """What an export wrote and left out, and the provenance of what it wrote."""

    written: int = 0
    # Kept samples left out, by reason (the ``left_out`` mapping's values).
    left_out: Counter[str] = field(default_factory=Counter)
    sources: set[str] = field(default_factory=set)
    # stage -> (model, engine, prompt_id) -> samples written
    models: dict[str, Counter[tuple[str, str, str]]] = field(default_factory=dict)

    def record(self, stage: str, row: Mapping[str, Any]) -> None:
        model, engine, pid = ("-" if row[name] is None else str(row[name]) for name in PROVENANCE)
        self.models.setdefault(stage, Counter())[(model, engine, pid)] += 1


@dataclass(frozen=True)
class CardInfo:
    """What the card says besides the rows: the config and the funnel's counts."""

    dataset: str
    source: Mapping[str, Any]  # config.datasets.D
    prompts: Mapping[str, str | Path]  # stage (HF_STAGES) -> prompt file
    funnel: Funnel  # the dataset's total funnel (vlmflow.core.contract)
    llava: str | None = None  # the LLaVA export of the same samples (train datasets)


# Columns of the HF dataset, with what the card says of each.
HF_COLUMNS = {
    "key": "the sample's key (unique in the dataset)",
    "image": "the image as ingested (JPEG or WebP bytes; decoded to PIL by `datasets`)",
    "web_caption": "the caption the source gave (alt text, caption column)",
    "vlm_caption": "the caption the VLM wrote",
    "attributes": "the final attribute list (phase 1 merged with phase 2)",
    "source": "the ingest source of the sample's shard (`kind:path`)",
    "shard": "the shard id",
    "url": "where the image came from (null when the source has no URL)",
    "caption_model": "the VLM, pinned (`org/name@<commit>`) or a local folder",
    "caption_engine": "the backend and version that wrote the caption",
    "phase1_model": "the LLM of attributes phase 1",
    "phase1_engine": "its backend and version",
    "phase2_model": "the LLM of attributes phase 2",
    "phase2_engine": "its backend and version",
}
# Stage name in the card -> column prefix.
HF_STAGES = {"caption": "caption", "attributes phase 1": "phase1", "attributes phase 2": "phase2"}
