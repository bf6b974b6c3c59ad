"""The training stage's settings (config.train), the projector's activations and LoRA's
target modules."""

from __future__ import annotations

from dataclasses import dataclass


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
