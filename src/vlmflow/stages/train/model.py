"""The model trained: a LLaVA built from a vision tower and a language model (or loaded),
what each phase trains, LoRA, FSDP units."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from vlmflow.core.models import (
    IMAGE,
    pretrained,
)
from vlmflow.core.vision import vision_model
from vlmflow.stages.train.settings import LORA_TARGETS, PROJECTOR_ACTIVATIONS, TrainSettings


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
