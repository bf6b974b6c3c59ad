"""Training stage: a LLaVA-style model (vision tower + projector + causal LM) in two phases.

Phase 1 trains the projector only, on the phase-1 HDF5 files; phase 2 trains the
projector and the language model on the phase-2 (instruction) files. The model is a
transformers ``LlavaForConditionalGeneration`` saved with ``save_pretrained``, so any
transformers user can load the result.

The package: settings (TrainSettings), loader (the H5 examples), model (building the
LLaVA, what trains, LoRA, FSDP units), loop (one step's pieces), checkpoints (resumable
state), trainer (PhaseTrainer), jobs (both phases as a job, launched over GPUs).
"""

from vlmflow.stages.train.jobs import TrainJob, launch, main, run
from vlmflow.stages.train.loader import H5Examples, H5Source
from vlmflow.stages.train.loop import masked_loss, model_inputs
from vlmflow.stages.train.model import build_llava, load_llava, set_trainable
from vlmflow.stages.train.settings import TrainSettings

__all__ = [
    "H5Examples",
    "H5Source",
    "TrainJob",
    "TrainSettings",
    "build_llava",
    "launch",
    "load_llava",
    "main",
    "masked_loss",
    "model_inputs",
    "run",
    "set_trainable",
]
