"""Exports users train from, built from the stages' own outputs.

* ``results/export/D/llava.json`` (train datasets): the phase-2 data as LLaVA-format
  conversations (``id``, ``image``, ``conversations``: a human turn ``<image>\\n{instruction}``
  and a gpt turn, the final attributes), the texts the phase-2 H5 samples are packed from
  (``vlmflow.core.prompts.phase2_turns``). ``image`` is relative to the H5 image root
  ``results/D/h5/images`` (the images the h5 stage wrote), so nothing is copied;
  ``llava.md`` beside it says so and how LLaVA, LLaMA-Factory and Cerebras read it.
* ``results/export/D/hf/`` (every dataset): the final dataset (image, web caption, VLM
  caption, attributes, provenance) as a Hugging Face ``datasets`` folder
  (``save_to_disk``; ``datasets.load_from_disk`` reads it), with a dataset card
  ``README.md``: sources, models with revisions, prompts, the funnel's counts, licence.

"Final" means kept by attributes phase 2 (``failure`` null). Every export takes
``left_out``: (shard, key) -> reason of samples to leave out (vlmflow.stages.duplicates'
duplicates.tsv: repeats and eval images leaked from train datasets), default none; the
cards count them by reason. Files are written atomically; the HF folder is built beside
its target and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.core.contract import read_columns
from vlmflow.core.io import atomic_dir, atomic_open, read_json
from vlmflow.core.prompts import phase2_turns
from vlmflow.core.shards import iter_samples
from vlmflow.stages.export.card import dataset_card, funnel_total
from vlmflow.stages.export.counts import (
    HF_COLUMNS,
    HF_STAGES,
    PROVENANCE,
    CardInfo,
    ExportCounts,
    ExportError,
    LeftOut,
)

log = logging.getLogger(__name__)


# --- stage outputs -----------------------------------------------------------------------


def rows_by_key(path: str | Path, columns: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
    """A stage parquet's ``key`` and ``columns`` by key, in row order (a missing column,
    or a key twice, is an error naming the file)."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in read_columns(path, ["key", *columns], what):
        if row["key"] in by_key:
            raise ExportError(f"{path}: key {row['key']!r} appears in two rows")
        by_key[row["key"]] = row
    return by_key


def final_rows(path: str | Path, columns: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The samples attributes phase 2 kept (``failure`` null), by key in row order, each
    with its non-empty final ``attributes`` list."""
    rows = rows_by_key(path, ["attributes", "failure", *columns], "attributes phase 2")
    kept = {key: row for key, row in rows.items() if row["failure"] is None}
    for key, row in kept.items():
        if not row["attributes"]:
            raise ExportError(
                f"{path}: sample {key!r} is kept (field 'failure' is null) but its field "
                "'attributes' is empty"
            )
    return kept


def _row_of(rows: Mapping[str, dict[str, Any]], key: str, path: Path) -> dict[str, Any]:
    try:
        return rows[key]
    except KeyError:
        raise ExportError(
            f"{path}: no row for sample {key!r}, which attributes phase 2 kept; is the file "
            "older than its input?"
        ) from None


# --- LLaVA conversations -------------------------------------------------------------------


@dataclass(frozen=True)
class LlavaSettings:
    """What the phase-2 H5 samples are built with (config.h5), and the image root."""

    dataset: str
    instruction: str
    phase2_style: str
    image_root: str  # the folder every ``image`` is relative to: results/D/h5/images


def llava_record(key: str, image: str, instruction: str, labels: Sequence[str]) -> dict[str, Any]:
    """One sample in LLaVA's format, with the phase-2 H5 sample's texts."""
    turns = phase2_turns(instruction, labels)
    return {
        "id": key,
        "image": image,
        "conversations": [
            {"from": "human", "value": turns.user},
            {"from": "gpt", "value": turns.answer},
        ],
    }


def image_files(folder: Path) -> dict[str, str]:
    """key -> file name of the images the h5 stage wrote into a shard's image folder."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: the h5 stage's image folder of this shard is missing")
    with os.scandir(folder) as entries:
        return {
            entry.name.rsplit(".", 1)[0]: entry.name
            for entry in entries
            if entry.is_file() and not entry.name.startswith(".")
        }


def llava_shard(
    phase2: Path, image_dir: Path, instruction: str, left_out: LeftOut, counts: ExportCounts
) -> Iterator[dict[str, Any]]:
    """One shard's kept samples as LLaVA records; ``image`` is ``S/{key}.jpg`` (the
    folder's name is the shard id)."""
    files = image_files(image_dir)
    shard = image_dir.name
    for key, row in final_rows(phase2).items():
        reason = left_out.get((shard, key))
        if reason is not None:
            counts.left_out[reason] += 1
            continue
        name = files.get(key)
        if name is None:
            raise ExportError(
                f"{image_dir}: no image of sample {key!r}, which {phase2} keeps; is the folder "
                "older than the parquet? Rerun the shard's h5 job"
            )
        counts.written += 1
        yield llava_record(key, f"{shard}/{name}", instruction, list(row["attributes"]))


def left_out_text(counts: ExportCounts) -> str:
    """``2 duplicate, 1 leak``, or ``none``."""
    parts = [f"{n} {reason}" for reason, n in sorted(counts.left_out.items())]
    return ", ".join(parts) or "none"


def write_json_list(path: str | Path, items: Iterable[Any]) -> int:
    """Write ``items`` as one JSON list, one item a line, streamed and atomically."""
    count = 0
    with atomic_open(path) as handle:
        handle.write("[")
        for item in items:
            handle.write(",\n" if count else "\n")
            handle.write(json.dumps(item, ensure_ascii=False))
            count += 1
        handle.write("\n]\n" if count else "]\n")
    return count


def export_llava(
    phase2_paths: Sequence[str | Path],
    image_dirs: Sequence[str | Path],
    settings: LlavaSettings,
    out_json: str | Path,
    out_card: str | Path,
    left_out: LeftOut | None = None,
) -> ExportCounts:
    """Write llava.json from each shard's phase-2 parquet and its H5 image folder (the
    lists are per shard, in the same order), and its companion card llava.md."""
    if len(phase2_paths) != len(image_dirs):
        raise ExportError(
            f"one image folder per phase-2 parquet expected: {len(phase2_paths)} parquets, "
            f"{len(image_dirs)} folders"
        )
    root = Path(settings.image_root)
    for folder in map(Path, image_dirs):
        if folder.parent != root:
            raise ExportError(f"{folder}: not a folder of the image root {root}")
    counts = ExportCounts()
    records = (
        record
        for phase2, folder in zip(phase2_paths, image_dirs, strict=True)
        for record in llava_shard(
            Path(phase2), Path(folder), settings.instruction, left_out or {}, counts
        )
    )
    write_json_list(out_json, records)
    with atomic_open(out_card) as handle:
        handle.write(llava_card(settings, counts, Path(out_json)))
    log.info("%s: %d samples, left out %s", out_json, counts.written, dict(counts.left_out))
    return counts


def llava_card(settings: LlavaSettings, counts: ExportCounts, out_json: Path) -> str:
    """llava.md: what llava.json holds, where its images are, how trainers read it."""
    root = settings.image_root
    relative = os.path.relpath(root, out_json.parent)
    llava = f"--data_path {out_json} --image_folder {root}"
    if settings.phase2_style == "vicuna_v1":
        template = (
            "The phase-2 H5 files use LLaVA's `vicuna_v1` layout: LLaVA's `v1` template "
            "renders these turns exactly as the H5 samples hold them."
        )
        llava += " --version v1"
    else:
        template = (
            "The phase-2 H5 files use the language model's own chat template "
            "(h5.phase2_style `chat_template`): train with that model's template."
        )
    dataset_info = {
        "file_name": out_json.name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "image"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
        },
    }
    return f"""# LLaVA conversations of dataset `{settings.dataset}`

`{out_json.name}`: {counts.written} samples, the phase-2 training data (the attributes kept
after both LLM phases) as LLaVA-format conversations. Left out: {left_out_text(counts)}.

**Images**: every `image` is relative to `{root}` (the H5 files' image root; `{relative}`
from this folder). Each sample is `{{"id": key, "image": "S/key.jpg", "conversations":
[human, gpt]}}`: the human turn is `<image>`, a newline and the instruction
"{settings.instruction}"; the gpt turn is the final attributes joined by ", ". {template}

- LLaVA: `{llava}`
- LLaMA-Factory: `--media_dir {root}` and the `dataset_info.json` entry
  `{json.dumps(dataset_info)}`
- Cerebras ModelZoo: `preprocess_dataset.py convert_json2jsonl --input_dir {out_json.parent}`,
  then `llava_phase_2_preproc.yaml` with `setup.image_dir: {root}`
"""


# --- Hugging Face dataset ------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFiles:
    """The per-shard files a shard's HF rows come from."""

    tar: Path
    stats: Path
    captions: Path
    phase1: Path
    phase2: Path


def shard_files(
    tars: Sequence[str | Path],
    stats: Sequence[str | Path],
    captions: Sequence[str | Path],
    phase1: Sequence[str | Path],
    phase2: Sequence[str | Path],
) -> list[ShardFiles]:
    """Per-shard lists (one file per shard of each stage, in the same order) as shards."""
    lengths = {len(tars), len(stats), len(captions), len(phase1), len(phase2)}
    if len(lengths) != 1:
        raise ExportError(
            f"one file per shard of each stage expected: {len(tars)} tars, {len(stats)} "
            f"stats, {len(captions)} captions, {len(phase1)} phase 1, {len(phase2)} phase 2"
        )
    columns = zip(tars, stats, captions, phase1, phase2, strict=True)
    return [ShardFiles(*map(Path, files)) for files in columns]


def hf_features() -> Any:
    """The ``datasets.Features`` of HF_COLUMNS."""
    import datasets

    text = datasets.Value("string")
    special = {"image": datasets.Image(), "attributes": datasets.List(text)}
    return datasets.Features({name: special.get(name, text) for name in HF_COLUMNS})


def shard_source(stats_path: Path) -> tuple[str, str]:
    """(shard id, source) of an ingest stats json."""
    stats = read_json(stats_path)
    try:
        return str(stats["shard"]), str(stats["source"])
    except (KeyError, TypeError) as exc:
        raise ExportError(f"{stats_path}: ingest stats without field {exc}") from None


def hf_row(
    sample: Any, rows: Mapping[str, Mapping[str, Any]], shard: str, source: str
) -> dict[str, Any]:
    """One HF row: the shard's sample and its row of each stage (HF_STAGES)."""
    return {
        "key": sample.key,
        "image": {"bytes": sample.image_data, "path": f"{sample.key}.{sample.image_ext}"},
        "web_caption": sample.web_caption,
        "vlm_caption": rows["caption"]["vlm_caption"],
        "attributes": list(rows["attributes phase 2"]["attributes"]),
        "source": source,
        "shard": shard,
        "url": sample.meta.get("url"),
        **{
            f"{prefix}_{name}": rows[stage][name]
            for stage, prefix in HF_STAGES.items()
            for name in ("model", "engine")
        },
    }


def hf_shard_rows(
    files: ShardFiles, left_out: LeftOut, counts: ExportCounts
) -> Iterator[dict[str, Any]]:
    """The HF rows of one shard's kept samples, in the shard's order."""
    shard, source = shard_source(files.stats)
    counts.sources.add(source)
    final = final_rows(files.phase2, PROVENANCE)
    earlier = {
        "caption": (files.captions, ["vlm_caption", *PROVENANCE]),
        "attributes phase 1": (files.phase1, list(PROVENANCE)),
    }
    by_stage = {
        stage: (path, rows_by_key(path, columns, stage))
        for stage, (path, columns) in earlier.items()
    }
    found = set()
    for sample in iter_samples(files.tar):
        final_row = final.get(sample.key)
        if final_row is None:
            continue
        found.add(sample.key)
        reason = left_out.get((shard, sample.key))
        if reason is not None:
            counts.left_out[reason] += 1
            continue
        rows = {
            stage: _row_of(by_key, sample.key, path) for stage, (path, by_key) in by_stage.items()
        }
        rows["attributes phase 2"] = final_row
        for stage, row in rows.items():
            counts.record(stage, row)
        counts.written += 1
        yield hf_row(sample, rows, shard, source)
    missing = sorted(final.keys() - found)
    if missing:
        raise ExportError(
            f"{files.tar}: {len(missing)} samples {files.phase2} keeps are not in the shard "
            f"(e.g. {missing[:3]}); is the parquet older than the shard?"
        )


def build_dataset(rows: Callable[[], Iterator[dict[str, Any]]], cache: Path) -> Any:
    """A ``datasets.Dataset`` of HF_COLUMNS from ``rows``, its arrow files in ``cache``;
    an error of ours in ``rows`` is raised as itself, not wrapped by ``datasets``."""
    import datasets

    try:
        return datasets.Dataset.from_generator(
            rows,
            features=hf_features(),
            cache_dir=str(cache),
            # A fresh cache: nothing to reuse, so no hash of the generator is needed.
            fingerprint=uuid.uuid4().hex,
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, ValueError):  # ExportError, ReportError, a bad shard
            raise exc.__cause__ from None
        raise


def export_hf(
    shards: Sequence[ShardFiles],
    card: CardInfo,
    out_dir: str | Path,
    left_out: LeftOut | None = None,
) -> ExportCounts:
    """Write the HF dataset folder: rows built into a cache folder beside the target,
    saved (``save_to_disk``) with the card into a temporary folder, renamed into place."""
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    counts = ExportCounts()

    def rows() -> Iterator[dict[str, Any]]:
        for files in shards:
            yield from hf_shard_rows(files, left_out or {}, counts)

    cache = Path(tempfile.mkdtemp(prefix=f".{final.name}.cache.", dir=final.parent))
    try:
        with atomic_dir(final) as tmp:
            table = build_dataset(rows, cache)
            table.save_to_disk(str(tmp))
            if len(table) != counts.written:
                raise ExportError(f"{final}: {len(table)} rows saved, {counts.written} built")
            del table
            (tmp / "README.md").write_text(dataset_card(card, counts), encoding="utf-8")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    log.info("%s: %d rows, left out %s", final, counts.written, dict(counts.left_out))
    return counts


__all__ = [
    "HF_COLUMNS",
    "CardInfo",
    "ExportCounts",
    "ExportError",
    "LeftOut",
    "LlavaSettings",
    "ShardFiles",
    "export_hf",
    "export_llava",
    "funnel_total",
    "shard_files",
]
