"""HDF5 stage: LLaVA training files in the layout of Cerebras ModelZoo's LLaVA reader.

Per file: dataset ``data`` of shape (n, 4, max_seq_len), int32, chunks (1, 4, max_seq_len),
gzip, whose rows are input_ids, loss_mask, labels and key_padding_mask (1 = padding, do
not attend); dataset ``img_path`` (n, 1) of byte strings relative to one image root; and
the attribute ``n_examples``. Image patches occupy ``num_patches`` pad-token slots that
the model fills with projected vision features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlmflow.core.errors import ConfigError
from vlmflow.core.h5_layout import (
    FEATURES,
    INPUT_IDS,
    KEY_PADDING_MASK,
    LABELS,
    LOSS_MASK,
    TEXT_ONLY,
    VISION_FEATURES,
    write_rows,
)
from vlmflow.core.io import (
    atomic_dir,
    read_json,
    read_parquet_rows,
    write_json,
)
from vlmflow.core.logs import progress_bar
from vlmflow.core.models import num_image_tokens, pad_token_id, pretrained
from vlmflow.core.prompts import phase2_layout
from vlmflow.core.shards import iter_samples
from vlmflow.core.vision import black_image, load_image, processor_side, vision_model

log = logging.getLogger(__name__)

PHASES = ("phase1", "phase2")
# processed: samples packed for the phase = n_examples (written) + discarded_too_long.
PHASE_COUNTS = ("processed", "n_examples", "discarded_too_long", "tokens", "loss_valid_tokens")
SHARED_PARAMS = (
    "settings",
    "language_model",
    "vision_tower",
    "num_patches",
    "bos_id",
    "eos_id",
    "pad_id",
    "vocab_size",
)


@dataclass(frozen=True)
class H5Settings:
    max_seq_len: int = 512
    phase1_text: str = "attributes"  # attributes | web_caption | vlm_caption
    instruction: str = "List the objects and attributes in the image."
    phase2_style: str = "vicuna_v1"  # or chat_template (see vlmflow.core.prompts.phase2_layout)
    # Store the frozen vision tower's features in the phase-1 files (run_shard's
    # vision_feature_layer), so phase-1 training never runs the tower.
    vision_features: bool = False


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int


@dataclass
class Example:
    """One packed sample: a (4, max_seq_len) int32 array and where its patches start."""

    rows: np.ndarray
    patch_start: int


def pack(
    prefix: list[int],
    num_patches: int,
    prompt: list[int],
    answer: list[int],
    ids: TokenIds,
    max_seq_len: int,
    end: int | None = None,
) -> Example | None:
    """Lay out ``prefix + patches + prompt + answer + end`` (``end``: EOS unless given)
    with loss on the answer only.

    The last patch slot predicts the first answer token when ``prompt`` is empty, so in
    phase 1 its loss mask is 1, as Cerebras' phase-1 files have it. Returns ``None`` when
    the sample does not fit: over-long samples are discarded, never truncated.
    """
    tokens = prefix + [ids.pad] * num_patches + prompt + answer + [ids.eos if end is None else end]
    if len(tokens) - 1 > max_seq_len:
        return None
    length = len(tokens) - 1
    rows = np.zeros((4, max_seq_len), dtype=np.int32)
    rows[INPUT_IDS, :length] = tokens[:-1]
    rows[LABELS, :length] = tokens[1:]
    rows[INPUT_IDS, length:] = ids.pad
    rows[LABELS, length:] = ids.pad
    # Position i is trained when its label tokens[i + 1] belongs to the answer or is EOS.
    first_answer = len(prefix) + num_patches + len(prompt)
    rows[LOSS_MASK, first_answer - 1 : length] = 1
    rows[KEY_PADDING_MASK, length:] = 1
    return Example(rows=rows, patch_start=len(prefix))


def phase1_example(
    tokenizer: Any, text: str, num_patches: int, ids: TokenIds, max_seq_len: int
) -> Example | None:
    """[BOS] [patches] text [EOS]: phase 1 drops the text prompt."""
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return pack([ids.bos], num_patches, [], answer, ids, max_seq_len)


def phase2_example(
    tokenizer: Any,
    instruction: str,
    labels: list[str],
    num_patches: int,
    ids: TokenIds,
    max_seq_len: int,
    style: str = "vicuna_v1",
) -> Example | None:
    """prefix [patches] prompt answer end, in ``style`` (vicuna_v1: system prompt, USER:
    [patches] instruction ASSISTANT: answer [EOS]; chat_template: the LM's own)."""
    layout = phase2_layout(tokenizer, instruction, labels, style, ids.bos, ids.eos)
    return pack(
        layout.prefix, num_patches, layout.prompt, layout.answer, ids, max_seq_len, layout.end
    )


def write_h5(
    path: str | Path,
    examples: list[Example],
    img_paths: Sequence[str | None],
    max_seq_len: int,
    extra: Callable[[h5py.File], None] | None = None,
) -> None:
    """Write one Cerebras-layout file atomically."""
    data = (
        np.stack([e.rows for e in examples])
        if examples
        else np.zeros((0, 4, max_seq_len), dtype=np.int32)
    )
    write_rows(path, data, img_paths, extra)


def vision_features_writer(
    vision_tower: str, feature_layer: int, image_root: Path, img_paths: Sequence[str | None]
) -> Callable[[h5py.File], None]:
    """Writes dataset ``vision_features`` (n, num_patches, hidden) float16: the frozen
    vision tower's hidden state ``feature_layer`` of each image, CLS dropped (LLaVA's
    "default" selection), so phase 1 trains the projector without running the tower."""

    def write(f: h5py.File) -> None:
        import torch
        from transformers import AutoImageProcessor

        from vlmflow.core.models import device

        tower = vision_model(vision_tower).to(device()).eval()
        processor = AutoImageProcessor.from_pretrained(**pretrained(vision_tower))
        config = tower.config
        patches, hidden = num_image_tokens(config), int(config.hidden_size)
        out = f.create_dataset(
            VISION_FEATURES,
            shape=(len(img_paths), patches, hidden),
            dtype="float16",
            chunks=(1, patches, hidden) if img_paths else None,
        )
        out.attrs["vision_tower"] = vision_tower
        out.attrs["vision_feature_layer"] = feature_layer
        batch_size = 32
        side = processor_side(processor)  # decoded exactly as the training loader does
        for start in range(0, len(img_paths), batch_size):
            names = img_paths[start : start + batch_size]
            images = [
                black_image(side)
                if name in (None, TEXT_ONLY)
                else load_image(image_root / name, side)
                for name in names
            ]
            pixels = processor(
                images=images, return_tensors="pt", input_data_format="channels_last"
            )["pixel_values"]
            with torch.inference_mode():
                states = tower(pixels.to(tower.device), output_hidden_states=True).hidden_states
            selected = states[feature_layer][:, 1:]
            out[start : start + len(images)] = selected.float().cpu().numpy().astype(np.float16)

    return write


def num_patches_of(vision_tower: str) -> int:
    """(image size / patch size)^2, read from the vision tower's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(**pretrained(vision_tower))
    return num_image_tokens(getattr(config, "vision_config", config))


# The fewest answer tokens a sample must have room for: a handful of short attributes.
ANSWER_ROOM = 16


@dataclass(frozen=True)
class SequenceBudget:
    """What one sample of each phase needs besides its answer, and the minimum
    ``h5.max_seq_len`` that leaves ``ANSWER_ROOM`` tokens for the answer in both."""

    num_patches: int
    phase1_overhead: int
    phase2_overhead: int

    @property
    def minimum(self) -> int:
        # input_ids are tokens[:-1]: a sample of n tokens takes n - 1 positions.
        return self.num_patches + max(self.phase1_overhead, self.phase2_overhead) + ANSWER_ROOM - 1

    def problem(self, max_seq_len: int, vision_tower: str, language_model: str) -> str | None:
        """Why ``max_seq_len`` cannot hold a sample, or None."""
        if max_seq_len >= self.minimum:
            return None
        return (
            f"config.h5.max_seq_len: {max_seq_len} leaves no room for an answer: "
            f"{vision_tower} gives {self.num_patches} image patches, and {language_model}'s "
            f"template takes {self.phase2_overhead} more tokens in phase 2 "
            f"({self.phase1_overhead} in phase 1), so every sample would be discarded as "
            f"too long. The minimum is {self.minimum} ({ANSWER_ROOM} answer tokens); "
            f"use at least {self.minimum}, e.g. {suggested_max_seq_len(self.minimum)}"
        )


def suggested_max_seq_len(minimum: int) -> int:
    """The next power of two at or above ``minimum`` (LLaVA-1.5's files use 2048)."""
    return 1 << max(minimum - 1, 1).bit_length()


def sequence_budget(tokenizer: Any, num_patches: int, settings: H5Settings) -> SequenceBudget:
    """The tokens each phase's layout adds around the image patches and the answer."""
    ids = token_ids(tokenizer)
    layout = phase2_layout(
        tokenizer, settings.instruction, [], settings.phase2_style, ids.bos, ids.eos
    )
    return SequenceBudget(
        num_patches=num_patches,
        phase1_overhead=2,  # BOS + EOS
        phase2_overhead=len(layout.prefix) + len(layout.prompt) + 1,
    )


class AllDiscardedError(ValueError):
    """Every sample of a shard that reached packing was too long: a config mistake."""


def token_ids(tokenizer: Any) -> TokenIds:
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} lacks a BOS or EOS token")
    # Without a pad token the EOS id fills patch slots and padding.
    return TokenIds(
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad_token_id(tokenizer)
    )


@dataclass
class PhaseRows:
    """One phase's packed samples of a shard, in row order."""

    examples: list[Example] = field(default_factory=list)
    img_paths: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    discarded_too_long: int = 0

    def add(self, example: Example | None, img_path: str, key: str) -> None:
        if example is None:
            self.discarded_too_long += 1
            return
        self.examples.append(example)
        self.img_paths.append(img_path)
        self.keys.append(key)

    def counts(self, out: str | Path) -> dict[str, Any]:
        """The phase's entry of the shard's json."""
        return {
            "file": Path(out).name,
            "keys": self.keys,
            "processed": len(self.examples) + self.discarded_too_long,
            "n_examples": len(self.examples),
            "discarded_too_long": self.discarded_too_long,
            "tokens": sum(int((e.rows[KEY_PADDING_MASK] == 0).sum()) for e in self.examples),
            "loss_valid_tokens": sum(int(e.rows[LOSS_MASK].sum()) for e in self.examples),
            "image_patch_start_idx": self.examples[0].patch_start if self.examples else None,
        }


@dataclass(frozen=True)
class Packer:
    """What packing a shard's samples needs besides the samples."""

    tokenizer: Any
    ids: TokenIds
    num_patches: int
    settings: H5Settings

    def phase1_text(
        self, labels: list[str], web_caption: str, captions: dict[str, Any], key: str
    ) -> str:
        """What phase 1 teaches for a sample (h5.phase1_text)."""
        if self.settings.phase1_text == "attributes":
            return ", ".join(labels)
        if self.settings.phase1_text == "web_caption":
            return web_caption
        return str(captions[key]["vlm_caption"])

    def examples(self, phase1_text: str, labels: list[str]) -> dict[str, Example | None]:
        settings = self.settings
        return {
            "phase1": phase1_example(
                self.tokenizer, phase1_text, self.num_patches, self.ids, settings.max_seq_len
            ),
            "phase2": phase2_example(
                self.tokenizer,
                settings.instruction,
                labels,
                self.num_patches,
                self.ids,
                settings.max_seq_len,
                settings.phase2_style,
            ),
        }


def pack_samples(
    packer: Packer,
    shard_tar: str | Path,
    phase1_parquet: str | Path,
    phase2_parquet: str | Path,
    shard_id: str,
    out_images: str | Path,
) -> tuple[dict[str, PhaseRows], dict[str, int]]:
    """Both phases' rows of a shard, with its images written under ``out_images``; the
    samples skipped (by the failure an earlier stage recorded)."""
    captions = {row["key"]: row for row in read_parquet_rows(phase1_parquet)}
    attributes = {row["key"]: row for row in read_parquet_rows(phase2_parquet)}
    phases = {name: PhaseRows() for name in PHASES}
    skipped: dict[str, int] = {}
    with atomic_dir(out_images) as image_dir:
        samples = iter_samples(shard_tar)
        for sample in progress_bar(
            samples, desc=f"h5 {shard_id}", unit="sample", total=len(attributes)
        ):
            row = attributes.get(sample.key)
            failure = "missing_attributes" if row is None else row["failure"]
            if row is None or failure is not None:
                skipped[failure] = skipped.get(failure, 0) + 1
                continue
            labels = list(row["attributes"])
            # Image paths are relative to the dataset's image root (results/D/h5/images).
            name = f"{sample.key}.{sample.image_ext}"
            (image_dir / name).write_bytes(sample.image_data)
            text = packer.phase1_text(labels, sample.web_caption, captions, sample.key)
            for phase, example in packer.examples(text, labels).items():
                phases[phase].add(example, f"{shard_id}/{name}", sample.key)
    return phases, skipped


def run_shard(
    shard_tar: str | Path,
    phase1_parquet: str | Path,
    phase2_parquet: str | Path,
    language_model: str,
    vision_tower: str,
    settings: H5Settings,
    shard_id: str,
    out_phase1: str | Path,
    out_phase2: str | Path,
    out_images: str | Path,
    out_params: str | Path,
    vision_feature_layer: int | None = None,
) -> dict[str, Any]:
    """Pack one shard. With ``vision_feature_layer`` the phase-1 file also holds the
    frozen vision tower's features of each image at that layer (see
    ``vision_features_writer``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(**pretrained(language_model))
    packer = Packer(tokenizer, token_ids(tokenizer), num_patches_of(vision_tower), settings)
    # Where the DAG could not check it (a model built by an earlier job), here.
    problem = sequence_budget(tokenizer, packer.num_patches, settings).problem(
        settings.max_seq_len, vision_tower, language_model
    )
    if problem is not None:
        raise AllDiscardedError(problem)
    phases, skipped = pack_samples(
        packer, shard_tar, phase1_parquet, phase2_parquet, shard_id, out_images
    )
    _check_some_fit(phases, shard_id, settings, packer.num_patches)
    params: dict[str, Any] = {
        "shard": shard_id,
        "settings": asdict(settings),
        "language_model": language_model,
        "vision_tower": vision_tower,
        "num_patches": packer.num_patches,
        "bos_id": packer.ids.bos,
        "eos_id": packer.ids.eos,
        "pad_id": packer.ids.pad,
        "vocab_size": len(tokenizer),
        "vision_feature_layer": vision_feature_layer if settings.vision_features else None,
        "skipped": skipped,
    }
    for name, out in zip(PHASES, (out_phase1, out_phase2), strict=True):
        extra = None
        if name == "phase1" and settings.vision_features:
            if vision_feature_layer is None:
                raise ValueError("h5.vision_features needs the train.vision_feature_layer")
            extra = vision_features_writer(
                vision_tower, vision_feature_layer, Path(out_images).parent, phases[name].img_paths
            )
        write_h5(out, phases[name].examples, phases[name].img_paths, settings.max_seq_len, extra)
        params[name] = phases[name].counts(out)
    write_json(out_params, params)
    log.info(
        "shard %s: phase1 %d, phase2 %d examples, skipped %s",
        shard_id,
        params["phase1"]["n_examples"],
        params["phase2"]["n_examples"],
        skipped,
    )
    return params


def _check_some_fit(
    phases: dict[str, PhaseRows], shard_id: str, settings: H5Settings, num_patches: int
) -> None:
    for name, phase in phases.items():
        if phase.discarded_too_long and not phase.examples:
            raise AllDiscardedError(
                f"shard {shard_id}: all {phase.discarded_too_long} {name} samples are "
                f"longer than config.h5.max_seq_len {settings.max_seq_len} (with "
                f"{num_patches} image patches); raise h5.max_seq_len or shorten the texts"
            )


def phase_totals(shards: Sequence[dict[str, Any]], phase: str) -> dict[str, int]:
    """The PHASE_COUNTS of one phase summed over the shards' h5 jsons."""
    totals = dict.fromkeys(PHASE_COUNTS, 0)
    for params in shards:
        for count in PHASE_COUNTS:
            totals[count] += params[phase][count]
    return totals


def first_patch_start(shards: Sequence[dict[str, Any]], phase: str) -> int | None:
    """Where the patches start in the phase's rows (the same in every shard with rows)."""
    return next((p[phase]["image_patch_start_idx"] for p in shards if p[phase]["n_examples"]), None)


def build_index(
    params_paths: list[str | Path],
    out_metadata: str | Path,
    out_data_params: str | Path,
    out_phase_params: Mapping[str, str | Path] | None = None,
    image_dir: str | Path | None = None,
) -> None:
    """key -> file and row for random access; dataset-wide counts in data_params.json;
    with ``out_phase_params`` (phase -> path) also each phase folder's data_params.json in
    Cerebras' shape (``cerebras_data_params``), images under ``image_dir`` (default: the
    ``images`` folder beside the phase folders)."""
    shards = [read_json(path) for path in params_paths]
    metadata: dict[str, dict[str, Any]] = {}
    skipped: dict[str, int] = {}
    for params in shards:
        for reason, count in params["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        for name in PHASES:
            phase = params[name]
            for row, key in enumerate(phase["keys"]):
                entry = metadata.setdefault(key, {"shard": params["shard"]})
                entry[name] = {"file": f"{name}/{phase['file']}", "row": row}
    write_json(out_metadata, metadata)
    # Settings and token ids are the same in every shard (they are the rule's params).
    first = shards[0] if shards else {}
    summary: dict[str, Any] = {key: first.get(key) for key in SHARED_PARAMS}
    summary.update(
        totals={name: phase_totals(shards, name) for name in PHASES},
        skipped=skipped,
        shards=len(shards),
    )
    summary["image_patch_start_idx"] = {name: first_patch_start(shards, name) for name in PHASES}
    write_json(out_data_params, summary)
    for name, path in (out_phase_params or {}).items():
        if name not in PHASES:
            raise ValueError(f"out_phase_params: unknown phase {name!r} (expected {PHASES})")
        folder = Path(path).parent
        images = Path(image_dir) if image_dir is not None else folder.parent / "images"
        write_json(path, cerebras_data_params(shards, name, folder, images))


def cerebras_data_params(
    shards: Sequence[dict[str, Any]], phase: str, folder: Path, image_dir: Path
) -> dict[str, Any]:
    """A phase folder's data_params.json with the sections and key names Cerebras
    ModelZoo's preprocessing writes beside its HDF5 files: ``processing`` (tokenizer,
    ``max_seq_length``, token ids, ``vocab_size``), ``dataset`` (``num_patches``,
    ``image_start_idx``, ...), ``features`` (the rows of ``data``), ``post-process``
    (``n_examples`` and token counts) and ``setup`` (folders); what has no Cerebras
    name is under ``vlmflow``."""
    first = shards[0] if shards else {}
    settings = first.get("settings") or {}
    max_seq_len = settings.get("max_seq_len")
    totals = phase_totals(shards, phase)
    num_tokens = totals["n_examples"] * (max_seq_len or 0)
    dataset: dict[str, Any] = {
        "is_multimodal": True,
        "max_num_img": 1,
        "num_patches": first.get("num_patches"),
        "image_start_idx": first_patch_start(shards, phase),
    }
    if phase == "phase2" and settings.get("phase2_style") == "vicuna_v1":
        dataset["system_prompt_style"] = "vicuna_v1"
    return {
        "setup": {"output_dir": str(folder), "image_dir": str(image_dir)},
        "processing": {
            "huggingface_tokenizer": first.get("language_model"),
            "max_seq_length": max_seq_len,
            **{key: first.get(key) for key in ("bos_id", "eos_id", "pad_id", "vocab_size")},
        },
        "dataset": dataset,
        "features": list(FEATURES),
        "post-process": {
            "n_examples": totals["n_examples"],
            "num_tokens": num_tokens,
            "loss_valid_tokens": totals["loss_valid_tokens"],
            "num_masked_tokens": num_tokens - totals["loss_valid_tokens"],
            "total_raw_docs": totals["processed"],
            "raw_docs_skipped": totals["discarded_too_long"],
        },
        "vlmflow": {
            "phase": phase,
            "files": [p[phase]["file"] for p in shards],
            "shards": len(shards),
            "vision_tower": first.get("vision_tower"),
            # Phase-1 files hold the tower's features of this layer (h5.vision_features).
            "vision_feature_layer": first.get("vision_feature_layer")
            if phase == "phase1"
            else None,
            "settings": settings,
            # Positions a sample occupies (key_padding_mask 0), image patch slots included.
            "attended_tokens": totals["tokens"],
        },
    }


def check_budget(config: dict[str, Any], vision_folder: str, lm_folder: str) -> None:
    """``h5.max_seq_len`` holds the image patches, the template and an answer, and fits
    the language model's context."""
    from transformers import AutoConfig, AutoTokenizer

    settings = H5Settings(**config["h5"])
    models = config["models"]
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    budget = sequence_budget(tokenizer, num_patches_of(vision_folder), settings)
    problem = budget.problem(settings.max_seq_len, models["vision_tower"], models["language_model"])
    if problem is not None:
        raise ConfigError(problem)
    context = getattr(AutoConfig.from_pretrained(lm_folder), "max_position_embeddings", None)
    if context is not None and settings.max_seq_len > context:
        raise ConfigError(
            f"config.h5.max_seq_len: {settings.max_seq_len} is longer than the context of "
            f"{models['language_model']} ({context} tokens, max_position_embeddings); use at "
            f"most {context} (at least {budget.minimum})"
        )
