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
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmflow.core import distributed
from vlmflow.core.h5_layout import (
    INPUT_IDS,
    KEY_PADDING_MASK,
    LABELS,
    LOSS_MASK,
    TEXT_ONLY,
    VISION_FEATURES,
)
from vlmflow.core.io import (
    atomic_dir,
    atomic_path,
    read_json,
    write_json,
)
from vlmflow.core.logs import progress_bar
from vlmflow.core.models import (
    IMAGE,
    num_image_tokens,
    pad_token_id,
    pretrained,
    save_llava,
)
from vlmflow.core.progress import Interrupted
from vlmflow.core.vision import black_image, load_image, processor_side, vision_model

if TYPE_CHECKING:
    from tqdm import tqdm

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
    # mlp2x_gelu: LLaVA-1.5's two layers with GELU; linear: an affine map, as nxtp's (two
    # layers with an identity activation, so the folder stays a LlavaForConditionalGeneration).
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    # Keep only the LM's first k decoder layers (nxtp's 6-layer decoder); None: all.
    language_model_layers: int | None = None
    # Phase 2: LoRA adapters (peft) on the LM instead of training all of it; 0: full.
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Phase 2: also train the top k vision encoder blocks that feed the projector.
    vision_trainable_blocks: int = 0

    def __post_init__(self) -> None:
        if self.projector not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"train projector {self.projector!r}: expected one of "
                f"{', '.join(PROJECTOR_ACTIVATIONS)}"
            )
        if self.phase == 1 and (self.lora_rank or self.vision_trainable_blocks):
            raise ValueError(
                "train.phase1: lora_rank and vision_trainable_blocks apply to phase 2; "
                "phase 1 trains the projector only"
            )


PROJECTOR_ACTIVATIONS = {"mlp2x_gelu": "gelu", "linear": "linear"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        with_features = []
        for number, source in enumerate(sources):
            with h5py.File(source.path, "r") as f:
                self.index.extend((number, row) for row in range(int(f.attrs["n_examples"])))
                with_features.append(VISION_FEATURES in f)
        # Precomputed vision features (h5.vision_features) replace the images.
        self.features = all(with_features) and bool(with_features)
        if any(with_features) and not self.features:
            missing = [
                str(s.path) for s, has in zip(sources, with_features, strict=True) if not has
            ]
            raise ValueError(
                f"some training files hold precomputed vision features and some do not "
                f"(without: {', '.join(missing)}); rebuild them with the same h5 settings"
            )
        self._files: dict[int, h5py.File] = {}
        self._paths: dict[int, list[str]] = {}
        self._target_side = processor_side(image_processor)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[dict[str, torch.Tensor]]:
        """A whole batch at once (the DataLoader asks for it so): rows read per file in
        one h5py call, images transformed in one image-processor call."""
        by_file: dict[int, list[tuple[int, int]]] = {}
        for position, item in enumerate(items):
            number, row = self.index[item]
            by_file.setdefault(number, []).append((row, position))
        rows: list[torch.Tensor | None] = [None] * len(items)
        images: list[np.ndarray | None] = [None] * len(items)
        features: list[torch.Tensor | None] = [None] * len(items)
        for number, wanted in by_file.items():
            if number not in self._files:
                self._files[number] = h5py.File(self.sources[number].path, "r")
                # A few bytes per row: read once, not once per batch.
                self._paths[number] = [p.decode() for p in self._files[number]["img_path"][:, 0]]
            f = self._files[number]
            ordered = sorted(set(row for row, _ in wanted))  # h5py reads increasing rows
            data = f["data"][ordered].astype(np.int64)
            at = {row: i for i, row in enumerate(ordered)}
            if self.features:
                stored = f[VISION_FEATURES][ordered]
                for row, position in wanted:
                    rows[position] = torch.from_numpy(data[at[row]])
                    features[position] = torch.from_numpy(stored[at[row]])
                continue
            paths = self._paths[number]
            for row, position in wanted:
                rows[position] = torch.from_numpy(data[at[row]])
                relative = paths[row]
                images[position] = (
                    black_image(self._target_side)
                    if relative == TEXT_ONLY
                    else self._load_image(self.sources[number].image_root / relative)
                )
        if self.features:
            return [
                {"rows": row, "vision_features": feature}
                for row, feature in zip(rows, features, strict=True)
                if row is not None and feature is not None
            ]
        pixels = self.image_processor(
            images=images, return_tensors="pt", input_data_format="channels_last"
        )["pixel_values"]
        return [
            {"rows": row, "pixel_values": pixels[i]}
            for i, row in enumerate(rows)
            if row is not None
        ]

    def _load_image(self, path: Path) -> np.ndarray:
        return load_image(path, self._target_side)


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

    vision = vision_model(vision_tower)
    lm = AutoModelForCausalLM.from_pretrained(**pretrained(language_model, dtype=torch.float32))
    if settings.language_model_layers is not None:
        truncate_layers(lm, settings.language_model_layers)
    tokenizer = AutoTokenizer.from_pretrained(**pretrained(language_model))
    image_processor = AutoImageProcessor.from_pretrained(**pretrained(vision_tower))
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
        lm.resize_token_embeddings(len(tokenizer))
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=tokenizer.get_vocab()[IMAGE],
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act=PROJECTOR_ACTIVATIONS[settings.projector],
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


def truncate_layers(lm: Any, keep: int) -> None:
    """Keep the first ``keep`` decoder layers of a causal LM (config updated to match)."""
    layers = lm.model.layers
    if not 1 <= keep <= len(layers):
        raise ValueError(
            f"train.language_model_layers {keep}: the language model has {len(layers)} layers"
        )
    lm.model.layers = layers[:keep]
    lm.config.num_hidden_layers = keep
    if isinstance(getattr(lm.config, "layer_types", None), list):
        lm.config.layer_types = lm.config.layer_types[:keep]


def vision_blocks_feeding_projector(model: Any, count: int) -> list[torch.nn.Module]:
    """The top ``count`` vision encoder blocks whose output the projector reads (blocks
    above ``vision_feature_layer`` never reach it)."""
    tower = model.model.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise ValueError(
            f"train.phase2.vision_trainable_blocks: {type(tower).__name__} has no encoder.layers"
        )
    layers = list(encoder.layers)
    # hidden_states holds the embeddings, then each block's output: entry f is the
    # output of block f - 1, so the first f blocks (f counted from the end if negative)
    # feed the projector.
    feature = model.config.vision_feature_layer
    top = feature if feature >= 0 else len(layers) + 1 + feature
    if not 1 <= count <= top:
        raise ValueError(
            f"train.phase2.vision_trainable_blocks {count}: {top} blocks feed the projector"
        )
    return layers[top - count : top]


def shard_fsdp(root: torch.nn.Module, model: Any, on: torch.device) -> torch.nn.Module:
    """FSDP (torch's fully_shard): each LM decoder layer its own unit, the rest with the
    root, over all ranks of the job (gloo on the CPU, NCCL on GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(on.type, (dist.get_world_size(),))
    for layer in decoder_layers(model.model.language_model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def decoder_layers(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LM's decoder layers, plain or inside peft's LoRA wrapper (``...layers.N``)."""
    layers = [
        module
        for name, module in language_model.named_modules()
        if name.rsplit(".", 2)[-2:-1] == ["layers"] and name.rsplit(".", 1)[-1].isdigit()
    ]
    if not layers:
        raise ValueError(f"train.fsdp: no decoder layers found in {type(language_model).__name__}")
    return layers


class FromFeatures(torch.nn.Module):
    """LLaVA's forward from precomputed vision features: project them, put them where
    the image tokens are, and run the language model (the vision tower never runs).
    A module of its own so that DDP wraps the projector and the LM together."""

    def __init__(self, llava: Any) -> None:
        super().__init__()
        self.llava = llava

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision_features: torch.Tensor
    ) -> Any:
        image_token = self.llava.config.image_token_index
        is_image = input_ids == image_token
        embed = self.llava.get_input_embeddings()
        embeds = embed(input_ids.masked_fill(is_image, 0))
        projected = self.llava.model.multi_modal_projector(vision_features.to(embeds.dtype))
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))
        return self.llava(inputs_embeds=embeds, attention_mask=attention_mask)


def set_trainable(model: Any, settings: TrainSettings) -> list[torch.nn.Parameter]:
    """Phase 1: projector only. Phase 2: projector and language model (all of it, or LoRA
    adapters on it), optionally the top vision blocks."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    modules = [model.model.multi_modal_projector]
    if settings.phase == 2:
        if settings.lora_rank:
            add_lora(model, settings)
        else:
            modules += [model.model.language_model, model.lm_head]
        if settings.vision_trainable_blocks:
            modules += vision_blocks_feeding_projector(model, settings.vision_trainable_blocks)
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(model: Any, settings: TrainSettings) -> None:
    """Wrap the language model with peft LoRA adapters (only they train in it)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=LORA_TARGETS,
    )
    model.model.language_model = get_peft_model(model.model.language_model, config)


def merge_lora(model: Any) -> None:
    """Fold LoRA adapters into the LM's weights, so the saved folder is plain LLaVA."""
    from peft import PeftModel

    if isinstance(model.model.language_model, PeftModel):
        model.model.language_model = model.model.language_model.merge_and_unload()


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


def _rng_state() -> dict[str, Any]:
    numpy_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "python": random.getstate(),
        # As a tensor: torch.load(weights_only=True) reads tensors, not numpy arrays.
        "numpy": [
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainCheckpoint:
    """Resumable training state beside the phase's output folder (``.NAME.checkpoint``).

    Every ``every`` optimiser steps (and when SIGTERM arrives) each rank saves its
    optimiser, scheduler, data-loader position (torchdata's StatefulDataLoader) and RNG
    states in ``step-N/rank-R.pt``, rank 0 the trainable weights in
    ``step-N/trainable.safetensors``, then rank 0 marks the step complete. With FSDP no
    rank holds the whole weights or optimiser state: each writes its shards of both with
    torch.distributed.checkpoint in ``step-N/sharded/``. A restarted job with the same
    fingerprint (settings, inputs, process count, FSDP or not) continues from the last
    complete step and logs the same losses as a run that was never stopped. Loading uses
    safetensors and ``torch.load(weights_only=True)``.
    """

    def __init__(self, out_dir: str | Path, fingerprint: dict[str, Any], every: int) -> None:
        out = Path(out_dir)
        self.folder = out.parent / f".{out.name}.checkpoint"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.every = every

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete step folder made with this fingerprint."""
        if not self.folder.is_dir():
            return None
        for step_dir in sorted(self.folder.glob("step-*"), reverse=True):
            marker = step_dir / "complete.json"
            if marker.exists() and read_json(marker).get("fingerprint") == self.fingerprint:
                return step_dir
        return None

    def save(
        self,
        step: int,
        trainable: dict[str, torch.Tensor] | None,
        state: dict[str, Any],
        rank: int,
    ) -> None:
        from safetensors.torch import save_file

        step_dir = self.folder / f"step-{step:08d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(step_dir / f"rank-{rank}.pt") as tmp:
            torch.save(state, tmp)
        if rank == 0 and trainable is not None:
            with atomic_path(step_dir / "trainable.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp)
        if dist.is_initialized():
            dist.barrier()  # every rank's file is on disk before the step counts as done
        if rank == 0:
            write_json(step_dir / "complete.json", {"step": step, "fingerprint": self.fingerprint})
            for old in self.folder.glob("step-*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint at step %d in %s", step, step_dir)

    def save_sharded(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        rank: int,
    ) -> None:
        """FSDP: each rank writes its own shards of the trainable weights and optimiser
        state (torch.distributed.checkpoint), besides its loader/RNG/scheduler state."""
        import torch.distributed.checkpoint as dcp

        step_dir = self.folder / f"step-{step:08d}"
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=step_dir / "sharded")
        self.save(step, None, state, rank)

    def load_sharded(
        self,
        step_dir: Path,
        rank: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        """Read an FSDP checkpoint into ``model`` and ``optimizer`` (same process count:
        the fingerprint says so); returns this rank's loader/RNG/scheduler state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        sharded = _sharded_state(model, optimizer)
        dcp.load(sharded, checkpoint_id=step_dir / "sharded")
        set_state_dict(
            model,
            optimizer,
            model_state_dict=sharded["model"],
            optim_state_dict=sharded["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        path = step_dir / f"rank-{rank}.pt"
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state

    def load(self, step_dir: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        weights = load_file(str(step_dir / "trainable.safetensors"))
        state = torch.load(step_dir / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
        return weights, state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable weights and optimiser state as this rank's shards (DTensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimiser_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": weights, "optimizer": optimiser_state}


def _sigterm_flag() -> tuple[list[bool], Any]:
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


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _source_state(sources: list[H5Source]) -> list[Any]:
    return [[str(s.path), s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources]


class PhaseTrainer:
    """One training phase as a sequence of hooks, in the manner of LLaVA's trainer:
    ``setup`` (model, data, wrapping, optimiser), ``resume`` (from a TrainCheckpoint),
    ``train`` (the epochs: a ``step`` per micro-batch, a ``checkpoint`` when due or on
    SIGTERM) and ``finish`` (the saved model folder). ``run`` calls them in that order.
    """

    rank: distributed.Rank
    on: torch.device
    model: Any
    processor: Any
    dataset: H5Examples
    sampler: DistributedSampler[dict[str, torch.Tensor]]
    loader: StatefulDataLoader[Any]
    trainable: list[torch.nn.Parameter]
    named_trainable: dict[str, torch.Tensor]
    forward: torch.nn.Module  # what the batches go through: the model, wrapped for DDP/FSDP
    sharded: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    pad_id: int
    num_patches: int
    image_token_id: int
    autocast: torch.autocast
    checkpoints: TrainCheckpoint
    bar: tqdm[Any]
    stop: list[bool]

    def __init__(
        self,
        sources: list[H5Source],
        out_dir: str | Path,
        settings: TrainSettings,
        vision_tower: str | None = None,
        language_model: str | None = None,
        init_from: str | None = None,
        checkpoint_every: int = 0,
        fsdp: bool = False,
    ) -> None:
        self.sources = sources
        self.out_dir = out_dir
        self.settings = settings
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.init_from = init_from
        self.checkpoint_every = checkpoint_every
        self.fsdp = fsdp
        # Where training stands: advanced by ``step``, restored by ``resume``.
        self.history: list[dict[str, Any]] = []
        self.global_step, self.tokens, self.started = 0, 0, 0.0
        self.first_epoch, self.first_micro = 0, 0
        self.resumed_loader: dict[str, Any] | None = None

    # -- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the job's processes, then build everything in a fixed order: the seed
        comes before the model (its fresh projector draws from it)."""
        self.rank = distributed.rank_from_env()
        self.on = distributed.init(self.rank)
        if self.settings.batch_size % self.rank.world_size:
            raise ValueError(
                f"train batch_size {self.settings.batch_size} cannot be split over "
                f"{self.rank.world_size} processes: make it a multiple of the process count"
            )
        generator = seed_everything(self.settings.seed)
        self.model, self.processor = self._load_model()
        self.model.to(self.on)
        self._setup_data(generator)
        self._setup_parallel()
        self._setup_optimiser()
        self._setup_inputs()
        log.info(
            "rank %d of %d on %s: %d examples, %d per step on this rank, %d optimiser steps",
            self.rank.rank,
            self.rank.world_size,
            self.on,
            len(self.dataset),
            self.settings.batch_size // self.rank.world_size,
            self.total_steps,
        )
        self.started = time.perf_counter()
        self.checkpoints = TrainCheckpoint(self.out_dir, self._fingerprint(), self.checkpoint_every)
        self.named_trainable = {
            name: p for name, p in self.model.named_parameters() if p.requires_grad
        }

    def _load_model(self) -> tuple[Any, Any]:
        if self.init_from is not None:
            return load_llava(self.init_from)
        if self.vision_tower is not None and self.language_model is not None:
            return build_llava(self.vision_tower, self.language_model, self.settings)
        raise ValueError("train.run needs init_from, or vision_tower and language_model")

    def _setup_data(self, generator: torch.Generator) -> None:
        self.dataset = H5Examples(self.sources, self.processor.image_processor)
        if len(self.dataset) == 0:
            files = ", ".join(str(s.path) for s in self.sources)
            raise ValueError(
                f"no training examples in {files}: every sample was skipped upstream; "
                "see the 'skipped' counts in each dataset's h5/data_params.json"
            )
        # The order of each epoch follows from (seed, epoch) alone, on one process or many,
        # so a resumed run only has to skip the batches it already took.
        self.sampler = DistributedSampler(
            self.dataset,
            num_replicas=self.rank.world_size,
            rank=self.rank.rank,
            shuffle=True,
            seed=self.settings.seed,
        )
        self.loader = StatefulDataLoader(
            self.dataset,
            batch_size=self.settings.batch_size // self.rank.world_size,
            sampler=self.sampler,
            generator=generator,
        )

    def _setup_parallel(self) -> None:
        """The trainable parameters, and the module the batches go through: the model
        (or FromFeatures around it), sharded by FSDP or replicated by DDP on many ranks."""
        self.trainable = set_trainable(self.model, self.settings)
        forward = FromFeatures(self.model) if self.dataset.features else self.model
        if self.dataset.features:
            log.info("training from precomputed vision features: the vision tower does not run")
        self.sharded = self.fsdp and self.rank.world_size > 1
        if self.sharded:
            forward = shard_fsdp(forward, self.model, self.on)
            # FSDP replaced the parameters with sharded ones: the optimiser takes those.
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
            log.info(
                "FSDP: parameters, gradients and optimiser state sharded over %d ranks",
                self.rank.world_size,
            )
        elif self.rank.world_size > 1:
            forward = DistributedDataParallel(
                forward, device_ids=[self.on.index] if self.on.type == "cuda" else None
            )
        self.forward = forward

    def _setup_optimiser(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        settings = self.settings
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=settings.lr, weight_decay=settings.weight_decay
        )
        steps_per_epoch = math.ceil(len(self.loader) / settings.grad_accum)
        self.total_steps = steps_per_epoch * settings.epochs
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(settings.warmup_ratio * self.total_steps), self.total_steps
        )

    def _setup_inputs(self) -> None:
        """What turning rows into model inputs needs, and the forward pass's autocast."""
        self.pad_id = pad_token_id(self.processor.tokenizer)
        self.num_patches = num_image_tokens(self.model.config.vision_config)
        self.image_token_id = self.model.config.image_token_index
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.on.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must have been made with to be resumed."""
        return {
            "settings": asdict(self.settings),
            "sources": _source_state(self.sources),
            "init_from": self.init_from,
            "vision_tower": self.vision_tower,
            "language_model": self.language_model,
            "processes": self.rank.world_size,
            "fsdp": self.sharded,
        }

    # -- resume ------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest complete checkpoint made with this fingerprint: its
        weights, optimiser, scheduler, RNG and loader states, log and counters."""
        resume_from = self.checkpoints.latest()
        if resume_from is None:
            return
        state = self._load_checkpoint(resume_from)
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.history = state["history"]
        self.global_step, self.tokens = state["step"], state["tokens"]
        self.first_epoch, self.first_micro = state["epoch"], state["micro_done"]
        self.resumed_loader = state["loader"]
        if self.first_micro >= len(self.loader):  # the checkpoint closed an epoch
            self.first_epoch, self.first_micro, self.resumed_loader = self.first_epoch + 1, 0, None
        log.info(
            "resuming from %s: step %d, epoch %d", resume_from, self.global_step, self.first_epoch
        )

    def _load_checkpoint(self, step_dir: Path) -> dict[str, Any]:
        """Load the weights and optimiser state (this rank's shards under FSDP) into the
        model and optimiser; returns the rest of this rank's state."""
        if self.sharded:
            return self.checkpoints.load_sharded(
                step_dir, self.rank.rank, self.forward, self.optimizer
            )
        weights, state = self.checkpoints.load(step_dir, self.rank.rank)
        with torch.no_grad():
            for name, parameter in self.named_trainable.items():
                parameter.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    # -- training loop -----------------------------------------------------------------

    def train(self) -> None:
        """The remaining epochs. SIGTERM (on any rank) makes every rank save a checkpoint
        after the current optimiser step and raise Interrupted."""
        self.stop, previous_handler = _sigterm_flag()
        self.bar = progress_bar(
            total=self.total_steps,
            initial=self.global_step,
            desc=f"train phase {self.settings.phase}",
            unit="step",
            disable=not self.rank.is_main,
        )
        try:
            self.model.train()
            for epoch in range(self.first_epoch, self.settings.epochs):
                self._train_epoch(epoch)
        finally:
            self.bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

    def _train_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        start_micro = 0
        if epoch == self.first_epoch and self.resumed_loader is not None:
            self.loader.load_state_dict(self.resumed_loader)
            start_micro = self.first_micro
        for micro, batch in enumerate(self.loader, start=start_micro):
            if not self.step(epoch, micro, batch):
                continue
            stopping = _any_rank(self.stop[0])
            if self.checkpoints.due(self.global_step) or stopping:
                self.checkpoint(epoch, micro)
            if stopping:
                raise Interrupted(
                    f"SIGTERM: stopped after step {self.global_step}, checkpoint saved"
                )

    def step(self, epoch: int, micro: int, batch: dict[str, torch.Tensor]) -> bool:
        """One micro-batch: forward, loss and backward; at the end of a gradient
        accumulation window (or of the epoch) also the optimiser step and its log entry.
        Returns whether the optimiser stepped."""
        inputs = model_inputs(batch["rows"], self.pad_id, self.image_token_id, self.num_patches)
        inputs = {k: v.to(self.on) for k, v in inputs.items()}
        steps_now = not (micro + 1) % self.settings.grad_accum or micro + 1 == len(self.loader)
        # DDP averages gradients on backward; between optimiser steps that is wasted work.
        sync = (
            contextlib.nullcontext()
            if steps_now or not isinstance(self.forward, DistributedDataParallel)
            else self.forward.no_sync()
        )
        with sync:
            logits = self._logits(inputs, batch)
            loss = masked_loss(logits, inputs["labels"], inputs["loss_mask"])
            (loss / self.settings.grad_accum).backward()
        self.tokens += int(inputs["attention_mask"].sum()) * self.rank.world_size
        if steps_now:
            self._optimiser_step(epoch, loss)
        return steps_now

    def _logits(self, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> Any:
        with self.autocast:
            vision = (
                {"vision_features": batch["vision_features"].to(self.on)}
                if self.dataset.features
                else {"pixel_values": batch["pixel_values"].to(self.on, self.model.dtype)}
            )
            return self.forward(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **vision
            ).logits

    def _optimiser_step(self, epoch: int, loss: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step ran at, before stepping
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        elapsed = time.perf_counter() - self.started
        entry = {
            "phase": self.settings.phase,
            "step": self.global_step,
            "epoch": epoch,
            "loss": distributed.mean_across_ranks(loss),
            "lr": lr,
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "processes": self.rank.world_size,
        }
        self.history.append(entry)
        log.info(json.dumps(entry))
        self.bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        self.bar.update(1)

    # -- checkpoint --------------------------------------------------------------------

    def checkpoint(self, epoch: int, micro: int) -> None:
        """Save the state after the optimiser step that ended micro-batch ``micro``."""
        state = {
            "step": self.global_step,
            "epoch": epoch,
            "micro_done": micro + 1,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": _rng_state(),
            "history": self.history,
            "tokens": self.tokens,
        }
        if self.sharded:
            self.checkpoints.save_sharded(
                self.global_step, self.forward, self.optimizer, state, self.rank.rank
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
            self.checkpoints.save(self.global_step, self.named_trainable, state, self.rank.rank)

    # -- finish ------------------------------------------------------------------------

    def finish(self) -> list[dict[str, Any]]:
        """Rank 0 saves the model (LoRA merged), its processor, metrics.jsonl and
        train_params.json and removes the checkpoint; every rank leaves the job."""
        full_state = self._gather_full_state()
        if not self.rank.is_main:
            distributed.finish()
            return self.history
        if full_state is not None and self.settings.lora_rank:
            # The sharded modules cannot merge adapters in place: load the gathered weights
            # into an unsharded copy of the same model (with its adapters) and merge there.
            self.model, _ = self._load_model()
            set_trainable(self.model, self.settings)
            self.model.load_state_dict(full_state)
            full_state = None
        self.model.eval()
        merge_lora(self.model)
        self._save(full_state)
        self.checkpoints.remove()
        distributed.finish()
        return self.history

    def _gather_full_state(self) -> dict[str, Any] | None:
        """FSDP: the full weights on the CPU (every rank takes part); else None."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _save(self, full_state: dict[str, Any] | None) -> None:
        with atomic_dir(self.out_dir) as tmp:
            # The hub's LLaVA names: transformers and vLLM both load the trained model.
            save_llava(self.model, tmp, full_state)
            self.processor.save_pretrained(tmp)
            with open(tmp / "metrics.jsonl", "w", encoding="utf-8") as handle:
                for entry in self.history:
                    handle.write(json.dumps(entry) + "\n")
            write_json(
                tmp / "train_params.json",
                {
                    "settings": asdict(self.settings),
                    "sources": [str(s.path) for s in self.sources],
                    "examples": len(self.dataset),
                    "steps": self.global_step,
                    "init_from": self.init_from,
                    "vision_tower": self.vision_tower,
                    "language_model": self.language_model,
                    "processes": self.rank.world_size,
                },
            )


def run(
    sources: list[H5Source],
    out_dir: str | Path,
    settings: TrainSettings,
    vision_tower: str | None = None,
    language_model: str | None = None,
    init_from: str | None = None,
    checkpoint_every: int = 0,
    fsdp: bool = False,
) -> list[dict[str, Any]]:
    """Train one phase and save the model, its processor and the per-step log.

    Runs on one process, or on every rank of a torchrun/srun launch (see
    vlmflow.core.distributed): each rank takes ``batch_size / world_size`` examples of every
    global batch, DDP averages the gradients, and rank 0 writes the output.
    """
    trainer = PhaseTrainer(
        sources,
        out_dir,
        settings,
        vision_tower=vision_tower,
        language_model=language_model,
        init_from=init_from,
        checkpoint_every=checkpoint_every,
        fsdp=fsdp,
    )
    trainer.setup()
    trainer.resume()
    trainer.train()
    return trainer.finish()


@dataclass(frozen=True)
class TrainJob:
    """Everything one training phase needs, as a file the launched processes read."""

    sources: list[H5Source]
    out_dir: str
    settings: TrainSettings
    vision_tower: str | None = None
    language_model: str | None = None
    init_from: str | None = None
    checkpoint_every: int = 0
    fsdp: bool = False

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
            "checkpoint_every": self.checkpoint_every,
            "fsdp": self.fsdp,
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
            checkpoint_every=data.get("checkpoint_every", 0),
            fsdp=data.get("fsdp", False),
        )

    def run(self) -> list[dict[str, Any]]:
        return run(
            self.sources,
            self.out_dir,
            self.settings,
            vision_tower=self.vision_tower,
            language_model=self.language_model,
            init_from=self.init_from,
            checkpoint_every=self.checkpoint_every,
            fsdp=self.fsdp,
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
    distributed.launch_module(launcher, "vlmflow.stages.train", spec, job.to_json(), log_file)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m vlmflow.stages.train JOB.json``."""
    args = sys.argv[1:] if argv is None else argv
    distributed.log_as_rank()
    TrainJob.from_json(read_json(args[0])).run()


if __name__ == "__main__":
    main()
