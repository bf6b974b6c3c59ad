"""PhaseTrainer: one phase's training loop (DDP or FSDP), with resumable checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmflow.core import distributed
from vlmflow.core.io import (
    atomic_dir,
    write_json,
)
from vlmflow.core.logs import progress_bar
from vlmflow.core.models import (
    num_image_tokens,
    pad_token_id,
    save_llava,
)
from vlmflow.core.progress import Interrupted
from vlmflow.stages.train.checkpoints import TrainCheckpoint, rng_state, set_rng_state
from vlmflow.stages.train.loader import H5Examples, H5Source
from vlmflow.stages.train.loop import (
    any_rank,
    masked_loss,
    model_inputs,
    seed_everything,
    sigterm_flag,
    source_state,
)
from vlmflow.stages.train.model import (
    FromFeatures,
    build_llava,
    load_llava,
    merge_lora,
    set_trainable,
    shard_fsdp,
)
from vlmflow.stages.train.settings import TrainSettings

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)


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
            "sources": source_state(self.sources),
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
        set_rng_state(state["rng"])
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
        self.stop, previous_handler = sigterm_flag()
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
            stopping = any_rank(self.stop[0])
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
            "rng": rng_state(),
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
