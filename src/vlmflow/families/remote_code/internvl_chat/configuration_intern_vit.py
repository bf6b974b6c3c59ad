"""Configuration of InternViT (``InternVisionModel``, model_type ``intern_vit_6b``), the
vision encoder of InternVL-Chat-V1.5 and the InternVL2 / 2.5 chat models, for vlmflow's
miniatures.

Written for vlmflow from the published config.json fields; it is not OpenGVLab's file.
The defaults are InternViT-6B-448px-V1-5's.
"""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """A ViT with a class token, learned position embeddings, layer scale (``ls1``,
    ``ls2``) and optional RMS-normalised queries and keys."""

    model_type = "intern_vit_6b"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 45
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1
