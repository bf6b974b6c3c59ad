"""Configuration of InternLM2 (``InternLM2ForCausalLM``, model_type ``internlm2``), the
language model of InternVL-Chat-V1.5 and the InternVL2 / 2.5 8B and 26B chat models, for
vlmflow's miniatures.

Written for vlmflow from the published config.json fields; it is not InternLM's file.
The defaults are internlm2-chat-20b's.
"""

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    """A Llama-style decoder whose attention packs queries, keys and values per KV head
    in one ``wqkv`` matrix."""

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers' class attribute)

    vocab_size: int = 92544
    hidden_size: int = 6144
    intermediate_size: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = False
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
