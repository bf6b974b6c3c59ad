"""InternLM2's fast tokenizer class (``InternLM2TokenizerFast``), for vlmflow's
miniatures.

Written for vlmflow; it is not InternLM's file. The published class also converts the
SentencePiece ``tokenizer.model`` when a folder has no ``tokenizer.json``; a miniature
ships its ``tokenizer.json``, which is all this class reads.
"""

from transformers import PreTrainedTokenizerFast


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012 (transformers' class attribute)
