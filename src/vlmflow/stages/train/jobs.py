"""The training job: both phases as the workflow runs them, in one process or launched
over a node's GPUs (``python -m vlmflow.stages.train JOB.json`` in each process)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from vlmflow.core import distributed
from vlmflow.core.io import (
    read_json,
)
from vlmflow.stages.train.loader import H5Source
from vlmflow.stages.train.settings import TrainSettings
from vlmflow.stages.train.trainer import PhaseTrainer


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
