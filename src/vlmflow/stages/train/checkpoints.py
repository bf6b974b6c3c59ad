"""Resumable training state: the model (whole or FSDP shards), the optimiser, the data
loaders' positions and every random generator, written atomically."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlmflow.core.io import (
    atomic_path,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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
