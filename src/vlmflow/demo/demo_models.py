"""The tiny random models of the demo and the tests, with the shapes and token
conventions of the real ones, written as the real ones are shipped (``save_pretrained``
folders; a Meta-format Llama 3 checkpoint), so that the stages' real loading code runs
on them offline in seconds. ``DEMO_BUILDERS`` is what the workflow's demo_model rule
builds, ``DEMO_OPTIONS`` the config.demo_models settings each one takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmflow.core.io import atomic_dir
from vlmflow.core.models import IMAGE, save_llava

if TYPE_CHECKING:
    import torch

# Special tokens of the demo tokenizer, named as Llama-3 names them so that prompt
# handling written for the real model (end-of-turn id, header tokens) is exercised.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", EOT, IMAGE]

# A Llama-3-style chat template that also accepts image content parts, so one
# template serves the instruct LM and the VLM.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# The tokenizer is trained on this fixed text rather than on the user's data, so the
# demo models (and everything downstream of them) do not change when data is added.
_TOKENIZER_CORPUS = """
a photo of a dog on the grass in a green field with trees and a blue sky
a red car parked on a city street next to a tall building at sunset
close up of a yellow flower with green leaves and water drops
a cat sleeping on a sofa near a window, wooden floor, white wall
mountains covered with snow above a lake, clouds, forest, rocks, river, bridge
a ladybird on a leaf, a bird on a branch, a boat on the sea, a beach with sand
a person walking on a road, a man, a woman, a child, people, a bicycle, a bench
1. dog 2. grass 3. green field 4. tree 5. blue sky 6. red car 7. building
- flower - leaf - water drop - sofa - window - floor - wall - mountain - lake
Here is the list: sand, wave, shell, stone, path, fence, house, roof, door
The image shows objects, attributes and adjective noun combinations.
Describe the image in detail. List the objects in the image.
A chat between a curious user and an artificial intelligence assistant.
USER: ASSISTANT: user assistant system
"""


def demo_corpus_lines() -> list[str]:
    """The fixed text the demo tokenizers are trained on."""
    return [line for line in _TOKENIZER_CORPUS.splitlines() if line.strip()]


def train_demo_tokenizer(
    vocab_size: int = 512,
    extra_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
    named_tokens: dict[str, str] | None = None,
) -> Any:
    """Train a small byte-level BPE and wrap it as a chat-capable fast tokenizer.

    ``extra_tokens`` are further special tokens (a VLM family's image markers) and
    ``named_tokens`` the attributes its processor looks them up by.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo_corpus_lines() * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=chat_template,
        extra_special_tokens=named_tokens or {"image_token": IMAGE},
    )


# The demo LMs' attention head size: the smallest vLLM's CPU attention takes.
DEMO_HEAD_DIM = 32
# What the demo models are, beyond their settings: a param of rule demo_model, so a new
# version rebuilds them (2: heads of 32 and the hub's LLaVA weight names, for vLLM).
DEMO_VERSION = 2


def tiny_llama_config(
    tokenizer: Any,
    hidden_size: int,
    layers: int,
    *,
    stop_ids: list[int] | None = None,
    context: int = 2048,
    architectures: list[str] | None = None,
) -> Any:
    """The demo LMs' Llama config: 4 heads of 32 dimensions over 2 KV heads (vLLM's CPU
    attention takes head sizes of 32 and more, so the demo runs on either backend),
    untied embeddings, the tokenizer's special ids; generation stops on ``stop_ids``
    (default: ``</s>`` and the end-of-turn token)."""
    from transformers import LlamaConfig

    if stop_ids is None:
        stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=DEMO_HEAD_DIM,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        architectures=architectures,
    )


def _tiny_clip_vision_config(image_size: int, patch_size: int, hidden_size: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def _clip_image_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _set_stop_ids(model: Any, tokenizer: Any) -> None:
    # Llama-3 Instruct ends a turn with <|eot_id|>, not with its EOS: generation must
    # stop on both, and the stages read the stop ids from generation_config.json.
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(EOT),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def build_demo_vlm(
    out_dir: str | Path, seed: int, image_size: int = 32, patch_size: int = 8
) -> None:
    """A tiny LLaVA (CLIP vision tower + Llama LM) with its processor and chat template."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    tokenizer = train_demo_tokenizer()
    config = LlavaConfig(
        vision_config=_tiny_clip_vision_config(image_size, patch_size, 32),
        text_config=tiny_llama_config(tokenizer, 32, 2),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    _set_stop_ids(model, tokenizer)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    with atomic_dir(out_dir) as tmp:
        save_llava(model, tmp)  # the hub's names, which vLLM reads too
        processor.save_pretrained(tmp)


def build_demo_internvl(
    out_dir: str | Path, seed: int, image_size: int = 32, patch_size: int = 8, max_tiles: int = 6
) -> None:
    """A tiny InternVL (``InternVLForConditionalGeneration``, the transformers-native
    port of InternVL-Chat): dynamic tiling of each image into up to ``max_tiles``
    ``image_size`` tiles plus a thumbnail, pixel-shuffled to a quarter of the patches."""
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    torch.manual_seed(seed)
    names = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    template = CHAT_TEMPLATE.replace(IMAGE, names["context_image_token"])
    tokenizer = train_demo_tokenizer(
        extra_tokens=tuple(names.values()), chat_template=template, named_tokens=names
    )
    downsample = 0.5  # InternVL's pixel shuffle: 2x2 patches become one image token
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=[image_size, image_size],
            patch_size=[patch_size, patch_size],
        ),
        text_config=tiny_llama_config(tokenizer, 32, 2),
        image_token_id=tokenizer.convert_tokens_to_ids(names["context_image_token"]),
        downsample_ratio=downsample,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = InternVLForConditionalGeneration(config)
    _set_stop_ids(model, tokenizer)
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=int((image_size // patch_size) ** 2 * downsample**2),
        chat_template=template,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def build_demo_qwen2vl(
    out_dir: str | Path, seed: int, patch_size: int = 4, max_pixels: int = 32 * 32
) -> None:
    """A tiny Qwen2-VL: native-resolution images (at most ``max_pixels``) as 2x2-merged
    patches, M-RoPE positions."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    markers = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    template = CHAT_TEMPLATE.replace(IMAGE, "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer = train_demo_tokenizer(
        extra_tokens=markers, chat_template=template, named_tokens={"image_token": markers[2]}
    )
    ids = tokenizer.convert_tokens_to_ids
    llama = tiny_llama_config(tokenizer, 32, 2)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": llama.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            # M-RoPE: the rotary half (head_dim 8 / 2) split over time, height and width.
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "bos_token_id": llama.bos_token_id,
            "eos_token_id": llama.eos_token_id,
            "pad_token_id": llama.pad_token_id,
            "tie_word_embeddings": False,
        },
        image_token_id=ids(markers[2]),
        video_token_id=ids(markers[3]),
        vision_start_token_id=ids(markers[0]),
        vision_end_token_id=ids(markers[1]),
    )
    model = Qwen2VLForConditionalGeneration(config)
    _set_stop_ids(model, tokenizer)
    pixels: dict[str, Any] = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
    limits: dict[str, Any] = {"min_pixels": (2 * patch_size) ** 2, "max_pixels": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, **limits),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels, **limits),
        chat_template=template,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def build_demo_llm(out_dir: str | Path, seed: int, delimiter_bias: float) -> None:
    """A tiny Llama-architecture instruct LM with a Llama-3-style chat template."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_demo_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, 32, 2))
    _set_stop_ids(model, tokenizer)
    # A random LM almost never emits a delimiter, so its noise would never parse as a
    # list and the demo would have no attributes downstream. A sequence bias in its
    # generation config (a standard transformers setting, visible in
    # generation_config.json) tilts the noise toward commas and newlines.
    model.generation_config.sequence_bias = [
        [[tokenizer.convert_tokens_to_ids(token)], delimiter_bias] for token in (",", "\u010a")
    ]
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_demo_vision_tower(
    out_dir: str | Path, seed: int, image_size: int = 32, patch_size: int = 8
) -> None:
    """A tiny CLIP vision encoder with its image processor (stands in for CLIP ViT-L/14)."""
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(_tiny_clip_vision_config(image_size, patch_size, 32))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        _clip_image_processor(image_size).save_pretrained(tmp)


def build_demo_language_model(out_dir: str | Path, seed: int) -> None:
    """A tiny base causal LM (stands in for Llama / Vicuna) for training."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_demo_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, 64, 2))
    _set_stop_ids(model, tokenizer)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_demo_metallama(out_dir: str | Path, seed: int, model_parallel: int = 1) -> None:
    """A tiny Llama 3 in Meta's checkpoint format (see vlmflow.families.meta_llama)."""
    build_demo_meta_llm(out_dir, seed, model_parallel=model_parallel)


DEMO_BUILDERS = {
    "vlm": build_demo_vlm,
    "internvl": build_demo_internvl,
    "qwenvl": build_demo_qwen2vl,
    "llm": build_demo_llm,
    "vision": build_demo_vision_tower,
    "lm": build_demo_language_model,
    "metallama": build_demo_metallama,
}

# The config.demo_models settings each builder takes: a rule's params hold only these, so
# changing one kind's setting rebuilds only that kind.
DEMO_OPTIONS: dict[str, tuple[str, ...]] = {
    "vlm": ("image_size", "patch_size"),
    "internvl": ("image_size", "patch_size"),
    "qwenvl": (),
    "llm": ("delimiter_bias",),
    "vision": ("image_size", "patch_size"),
    "lm": (),
    "metallama": ("model_parallel",),
}


def demo_bpe_ranks(vocab_size: int = 400) -> dict[bytes, int]:
    """A small byte-level BPE (trained with ``tokenizers`` on the demo corpus) as tiktoken
    ranks: the 256 bytes, then the merges in the order they were learnt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo_corpus_lines() * 20, trainer)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        raw = bytes(to_byte[char] for char in token)
        if raw not in ranks:
            ranks[raw] = len(ranks)
    return ranks


def build_demo_meta_llm(
    out_dir: str | Path, seed: int, model_parallel: int = 1, dim: int = 32, layers: int = 2
) -> None:
    """A tiny random Llama 3 written as Meta ships one: ``model_parallel`` consolidated
    shards, params.json and a tiktoken tokenizer.model. The same seed gives the same
    weights whatever the number of shards."""
    import torch

    from vlmflow.families.meta_llama import (
        NUM_SPECIAL_TOKENS,
        MetaParams,
        split_state,
        write_tokenizer_model,
    )

    ranks = demo_bpe_ranks()
    params = MetaParams(
        dim=dim,
        n_layers=layers,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=len(ranks) + NUM_SPECIAL_TOKENS,
        multiple_of=16,
        norm_eps=1e-5,
        rope_theta=500000.0,
    )
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    kv = params.kv_heads * params.head_dim
    full: dict[str, torch.Tensor] = {"tok_embeddings.weight": weight(params.vocab_size, dim)}
    for i in range(layers):
        prefix = f"layers.{i}."
        full |= {
            prefix + "attention.wq.weight": weight(dim, dim),
            prefix + "attention.wk.weight": weight(kv, dim),
            prefix + "attention.wv.weight": weight(kv, dim),
            prefix + "attention.wo.weight": weight(dim, dim),
            prefix + "feed_forward.w1.weight": weight(params.ffn_hidden, dim),
            prefix + "feed_forward.w2.weight": weight(dim, params.ffn_hidden),
            prefix + "feed_forward.w3.weight": weight(params.ffn_hidden, dim),
            prefix + "attention_norm.weight": torch.ones(dim),
            prefix + "ffn_norm.weight": torch.ones(dim),
        }
    full |= {"norm.weight": torch.ones(dim), "output.weight": weight(params.vocab_size, dim)}
    with atomic_dir(out_dir) as tmp:
        for rank, shard in enumerate(split_state(full, model_parallel)):
            torch.save(shard, Path(tmp) / f"consolidated.{rank:02d}.pth")
        (Path(tmp) / "params.json").write_text(json.dumps(params.to_json(), indent=2))
        write_tokenizer_model(ranks, Path(tmp) / "tokenizer.model")
