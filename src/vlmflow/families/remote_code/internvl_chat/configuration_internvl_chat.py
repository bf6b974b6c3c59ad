"""Configuration of the InternVL chat-model family (``InternVLChatModel``), for vlmflow's
miniatures of InternVL-Chat-V1.5 / InternVL2 / InternVL2.5.

Written for vlmflow from the family's published interface (config.json fields and the
model cards' usage); it is not OpenGVLab's file. It is copied into a model folder next
to ``config.json`` and loaded by transformers as remote code (``trust_remote_code``), by
vlmflow's transformers and by the vLLM engine's own.

The vision encoder is InternViT (``intern_vit_6b``, the published checkpoints') or
transformers' InternVL vision model (``internvl_vision``, which vlmflow's modeling file
runs); the language model is InternLM2 or any causal LM transformers knows (Llama,
Qwen2, ...).
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config


def _vision_config(config: "dict | PretrainedConfig | None") -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    config = dict(config or {})
    if config.get("model_type", "intern_vit_6b") == "intern_vit_6b":
        return InternVisionConfig(**config)
    return InternVLVisionConfig(**config)


def _llm_config(config: "dict | PretrainedConfig | None") -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    config = dict(config or {"architectures": ["InternLM2ForCausalLM"]})
    architectures = config.get("architectures") or []
    if "InternLM2ForCausalLM" in architectures or config.get("model_type") == "internlm2":
        return InternLM2Config(**config)
    model_type = config.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **config)


class InternVLChatConfig(PretrainedConfig):
    """A vision encoder (``vision_config``), a pixel-shuffle MLP projector and a causal
    LM (``llm_config``), with the dynamic-resolution settings of the family."""

    model_type = "internvl_chat"
    sub_configs = {"vision_config": PretrainedConfig, "llm_config": PretrainedConfig}  # noqa: RUF012 (transformers' class attribute)

    vision_config: dict | PretrainedConfig | None = None
    llm_config: dict | PretrainedConfig | None = None
    # Hidden layer of the vision encoder the image features come from (-1: the last).
    select_layer: int = -1
    # Tile side in pixels; None: the vision encoder's image size.
    force_image_size: int | None = None
    # Pixel shuffle: 0.5 folds each 2x2 block of patches into one image token.
    downsample_ratio: float = 0.5
    # Conversation template of the language model (see modeling_internvl_chat.TEMPLATES).
    template: str | None = None
    # The system message of every conversation; None: the template's own.
    system_message: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.vision_config = _vision_config(self.vision_config)
        self.llm_config = _llm_config(self.llm_config)
        super().__post_init__(**kwargs)
