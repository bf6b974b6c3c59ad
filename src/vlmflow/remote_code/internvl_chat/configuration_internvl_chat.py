"""Configuration of the InternVL chat-model family (``InternVLChatModel``), for vlmflow's
miniature of InternVL-Chat-V1.5 / InternVL2 / InternVL2.5.

Written for vlmflow from the family's published interface (config.json fields and the
model cards' usage); it is not OpenGVLab's file. It is copied into a model folder next
to ``config.json`` and loaded by transformers as remote code (``trust_remote_code``).
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig


class InternVLChatConfig(PretrainedConfig):
    """A vision encoder (``vision_config``), a pixel-shuffle MLP projector and a causal
    LM (``llm_config``), with the dynamic-resolution settings of the family."""

    model_type = "internvl_chat"
    sub_configs_defaults = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "vision_config": SubConfigSpec(config_class=InternVLVisionConfig),
        "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

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
