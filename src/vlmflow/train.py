"""Training stage: a LLaVA-style model (vision tower + projector + causal LM) in two phases.

Phase 1 trains the projector only, on the phase-1 HDF5 files; phase 2 trains the
projector and the language model on the phase-2 (instruction) files. The model is a
transformers ``LlavaForConditionalGeneration`` saved with ``save_pretrained``, so any
transformers user can load the result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlmflow import distributed
from vlmflow.io import (
    INPUT_IDS,
    KEY_PADDING_MASK,
    LABELS,
    LOSS_MASK,
    atomic_dir,
    read_json,
    write_json,
)
from vlmflow.models import IMAGE, num_image_tokens, pad_token_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    phase: int
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    projector_hidden_act: str = "gelu"  # LLaVA-1.5's mlp2x_gelu projector
    vision_feature_layer: int = -2


@dataclass(frozen=True)
class H5Source:
    """One HDF5 file and the folder its ``img_path`` entries are relative to."""

    path: Path
    image_root: Path


class H5Examples(Dataset[dict[str, torch.Tensor]]):
    """Rows of Cerebras-layout LLaVA files with their images, opened lazily.

    h5py handles must not be shared across DataLoader worker processes, so each
    process opens the files on first use.
    """

    def __init__(self, sources: list[H5Source], image_processor: Any) -> None:
        self.sources = sources
        self.image_processor = image_processor
        self.index: list[tuple[int, int]] = []
        for number, source in enumerate(sources):
            with h5py.File(source.path, "r") as f:
                self.index.extend((number, row) for row in range(int(f.attrs["n_examples"])))
        self._files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        number, row = self.index[item]
        if number not in self._files:
            self._files[number] = h5py.File(self.sources[number].path, "r")
        f = self._files[number]
        rows = torch.from_numpy(f["data"][row].astype(np.int64))
        relative = f["img_path"][row][0].decode()
        with Image.open(self.sources[number].image_root / relative) as img:
            pixels = self.image_processor(images=img.convert("RGB"), return_tensors="pt")
        return {"rows": rows, "pixel_values": pixels["pixel_values"][0]}


def _vision_model(vision_tower: str) -> Any:
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(vision_tower)
    if hasattr(config, "vision_config"):  # a full CLIP checkpoint: keep its vision half
        return CLIPVisionModel.from_pretrained(vision_tower)
    return AutoModel.from_pretrained(vision_tower)


def build_llava(vision_tower: str, language_model: str, settings: TrainSettings) -> tuple[Any, Any]:
    """Join a pretrained vision tower and causal LM with a fresh projector."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = _vision_model(vision_tower)
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    image_processor = AutoImageProcessor.from_pretrained(vision_tower)
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
        lm.resize_token_embeddings(len(tokenizer))
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=tokenizer.get_vocab()[IMAGE],
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act=settings.projector_hidden_act,
    )
    torch.manual_seed(settings.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = lm.generation_config
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
        image_token=IMAGE,
    )
    return model, processor


def load_llava(folder: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(folder)


def set_trainable(model: Any, phase: int) -> list[torch.nn.Parameter]:
    """Phase 1: projector only. Phase 2: projector and language model."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    modules = [model.model.multi_modal_projector]
    if phase == 2:
        modules += [model.model.language_model, model.lm_head]
    trainable = [p for module in modules for p in module.parameters()]
    for parameter in trainable:
        parameter.requires_grad = True
    return trainable


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


def run(
    sources: list[H5Source],
    out_dir: str | Path,
    settings: TrainSettings,
    vision_tower: str | None = None,
    language_model: str | None = None,
    init_from: str | None = None,
) -> list[dict[str, Any]]:
    """Train one phase and save the model, its processor and the per-step log.

    Runs on one process, or on every rank of a torchrun/srun launch (see
    vlmflow.distributed): each rank takes ``batch_size / world_size`` examples of every
    global batch, DDP averages the gradients, and rank 0 writes the output.
    """
    from transformers import get_cosine_schedule_with_warmup

    rank = distributed.rank_from_env()
    on = distributed.init(rank)
    if settings.batch_size % rank.world_size:
        raise ValueError(
            f"train batch_size {settings.batch_size} cannot be split over "
            f"{rank.world_size} processes: make it a multiple of the process count"
        )
    generator = seed_everything(settings.seed)
    if init_from is not None:
        model, processor = load_llava(init_from)
    elif vision_tower is not None and language_model is not None:
        model, processor = build_llava(vision_tower, language_model, settings)
    else:
        raise ValueError("train.run needs init_from, or vision_tower and language_model")
    model.to(on)
    dataset = H5Examples(sources, processor.image_processor)
    if len(dataset) == 0:
        files = ", ".join(str(s.path) for s in sources)
        raise ValueError(
            f"no training examples in {files}: every sample was skipped upstream; "
            "see the 'skipped' counts in each dataset's h5/data_params.json"
        )
    sampler: DistributedSampler[dict[str, torch.Tensor]] | None = (
        DistributedSampler(
            dataset, num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=settings.seed
        )
        if rank.world_size > 1
        else None
    )
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size // rank.world_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
    )
    trainable = set_trainable(model, settings.phase)
    forward = model
    if rank.world_size > 1:
        forward = DistributedDataParallel(
            model, device_ids=[on.index] if on.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps
    )
    tokenizer = processor.tokenizer
    pad_id = pad_token_id(tokenizer)
    num_patches = num_image_tokens(model.config.vision_config)
    image_token_id = model.config.image_token_index
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if on.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    log.info(
        "rank %d of %d on %s: %d examples, %d per step on this rank, %d optimiser steps",
        rank.rank,
        rank.world_size,
        on,
        len(dataset),
        settings.batch_size // rank.world_size,
        total_steps,
    )

    history: list[dict[str, Any]] = []
    step, tokens, started = 0, 0, time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for micro, batch in enumerate(loader):
            inputs = model_inputs(batch["rows"], pad_id, image_token_id, num_patches)
            inputs = {k: v.to(on) for k, v in inputs.items()}
            steps_now = not (micro + 1) % settings.grad_accum or micro + 1 == len(loader)
            # DDP averages gradients on backward; between optimiser steps that is wasted work.
            sync = (
                contextlib.nullcontext()
                if steps_now or not isinstance(forward, DistributedDataParallel)
                else forward.no_sync()
            )
            with sync:
                with autocast:
                    logits = forward(
                        input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"],
                        pixel_values=batch["pixel_values"].to(on, model.dtype),
                    ).logits
                loss = masked_loss(logits, inputs["labels"], inputs["loss_mask"])
                (loss / settings.grad_accum).backward()
            tokens += int(inputs["attention_mask"].sum()) * rank.world_size
            if not steps_now:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step ran at, before stepping
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            entry = {
                "phase": settings.phase,
                "step": step,
                "epoch": epoch,
                "loss": distributed.mean_across_ranks(loss),
                "lr": lr,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                "processes": rank.world_size,
            }
            history.append(entry)
            log.info(json.dumps(entry))

    if not rank.is_main:
        distributed.finish()
        return history
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(tmp / "metrics.jsonl", "w", encoding="utf-8") as handle:
            for entry in history:
                handle.write(json.dumps(entry) + "\n")
        write_json(
            tmp / "train_params.json",
            {
                "settings": asdict(settings),
                "sources": [str(s.path) for s in sources],
                "examples": len(dataset),
                "steps": step,
                "init_from": init_from,
                "vision_tower": vision_tower,
                "language_model": language_model,
                "processes": rank.world_size,
            },
        )
    distributed.finish()
    return history


@dataclass(frozen=True)
class TrainJob:
    """Everything one training phase needs, as a file the launched processes read."""

    sources: list[H5Source]
    out_dir: str
    settings: TrainSettings
    vision_tower: str | None = None
    language_model: str | None = None
    init_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [
                {"path": str(source.path), "image_root": str(source.image_root)}
                for source in self.sources
            ],
            "out_dir": self.out_dir,
            "settings": asdict(self.settings),
            "vision_tower": self.vision_tower,
            "language_model": self.language_model,
            "init_from": self.init_from,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainJob:
        return cls(
            sources=[H5Source(Path(s["path"]), Path(s["image_root"])) for s in data["sources"]],
            out_dir=data["out_dir"],
            settings=TrainSettings(**data["settings"]),
            vision_tower=data["vision_tower"],
            language_model=data["language_model"],
            init_from=data["init_from"],
        )

    def run(self) -> list[dict[str, Any]]:
        return run(
            self.sources,
            self.out_dir,
            self.settings,
            vision_tower=self.vision_tower,
            language_model=self.language_model,
            init_from=self.init_from,
        )


def launch(job: TrainJob, launcher: str | None, log_file: IO[str]) -> None:
    """Run ``job`` here (no launcher) or on every process ``launcher`` starts.

    ``launcher`` is the training rule's ``mpi`` resource from the profile, e.g. ``srun``
    (one task per GPU of the Slurm allocation) or ``torchrun --standalone
    --nproc-per-node=2``. The processes write their logs to ``log_file``.
    """
    if not launcher:
        job.run()
        return
    spec = Path(job.out_dir).parent / f".{Path(job.out_dir).name}.job.json"
    distributed.launch_module(launcher, "vlmflow.train", spec, job.to_json(), log_file)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m vlmflow.train JOB.json``."""
    args = sys.argv[1:] if argv is None else argv
    rank = distributed.rank_from_env()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s rank {rank.rank}/{rank.world_size} %(levelname)s %(message)s",
    )
    TrainJob.from_json(read_json(args[0])).run()


if __name__ == "__main__":
    main()
