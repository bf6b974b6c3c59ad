"""Shape-faithful miniatures of the real checkpoints the presets name.

Each miniature is a tiny random model of the *same architecture class, preprocessing and
token conventions* as a real checkpoint: the same image size, patch size and pixel budget
(576 patches for CLIP ViT-L/14-336, 256 for ViT-L/14 at 224, Qwen2-VL's 14-px patches
merged 2x2), the same special tokens, end-of-turn tokens, pad conventions and chat
template (Llama-3's ``<|eot_id|>``, Vicuna's ``</s>`` and no template, ChatML's
``<|im_end|>``), the same context length; only widths, depths and the vocabulary are
shrunk. They are written into a Hugging Face hub cache under the repo id and the revision
a preset pins, so the workflow loads them with ``from_pretrained("org/name",
revision=...)`` and ``HF_HUB_OFFLINE=1`` exactly as it loads the real weights:
``vlmflow miniatures --configfile config/presets/llava15.yaml --cache DIR``.

The chat templates and processor settings are written here from the published formats
and numbers (model cards and public configs); no file of those repositories is copied.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vlmflow.core.io import atomic_dir
from vlmflow.core.models import COMMIT, is_hub_id, save_llava, split_revision
from vlmflow.demo import internvl_minis
from vlmflow.demo.demo_models import demo_corpus_lines
from vlmflow.families import internvl_chat

log = logging.getLogger(__name__)

# The published image normalisations: OpenAI CLIP's (also Qwen2-VL's), ImageNet's (InternVL).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llama 3 Instruct: a header per turn, each turn closed by <|eot_id|>, BOS once.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Qwen2-VL Instruct: ChatML with a default system turn; an image part becomes the vision
# markers around one <|image_pad|>, which the processor expands to the image's tokens.
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
LLAMA3_SPECIALS += ["<|end_header_id|>", "<|eot_id|>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"]
QWEN_SPECIALS += ["<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def bpe_tokenizer(
    special_tokens: list[str],
    chat_template: str | None = None,
    vocab_size: int = 512,
    **named: str | None,
) -> Any:
    """A small byte-level BPE trained on the demo corpus, wrapped as a fast tokenizer with
    a real checkpoint's special tokens (``named``: bos_token, eos_token, pad_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo_corpus_lines() * 20, trainer)
    names = {key: value for key, value in named.items() if value is not None}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=chat_template, **names)


def _llama_config(tokenizer: Any, **sizes: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **sizes,
    )


def _list_bias(model: Any, tokenizer: Any, bias: float) -> None:
    """Tilt a random LM toward commas and newlines so its noise parses as lists (the one
    setting real checkpoints do not have; it sits in generation_config.json)."""
    model.generation_config.sequence_bias = [
        [[tokenizer.convert_tokens_to_ids(token)], bias] for token in (",", "\u010a")
    ]


def build_llama3_instruct(out_dir: str | Path, seed: int, list_bias: float = 2.5) -> None:
    """Meta-Llama-3-8B-Instruct in miniature: 8,192 context, GQA 4:1, rope theta 500k, no
    pad token, chat turns closed by ``<|eot_id|>`` and generation stopping on it and on
    ``<|end_of_text|>`` (the published generation_config)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(
        LLAMA3_SPECIALS,
        LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    config = _llama_config(
        tokenizer,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    model = LlamaForCausalLM(config)
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.bos_token_id = ids("<|begin_of_text|>")
    model.generation_config.eos_token_id = [ids("<|end_of_text|>"), ids("<|eot_id|>")]
    _list_bias(model, tokenizer, list_bias)
    _save(out_dir, model, tokenizer)


def build_llama2(out_dir: str | Path, seed: int, layers: int = 2, chat: bool = False) -> None:
    """Llama-2-7B / Vicuna-7B v1.5 in miniature: 4,096 context, full multi-head attention,
    ``<s>``/``</s>``/``<unk>`` and no pad token, no chat template (Vicuna's conversations
    are LLaVA's ``vicuna_v1`` text: ``USER:`` ... ``ASSISTANT:`` answer ``</s>``)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(
        SENTENCEPIECE_SPECIALS, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = _llama_config(
        tokenizer,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if chat:
        _list_bias(model, tokenizer, 2.5)
    _save(out_dir, model, tokenizer)


# LLaVA-1.5 (llava-hf): one user turn "USER: <image>\n{text} ASSISTANT:", answers closed by </s>.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava15_hf(out_dir: str | Path, seed: int) -> None:
    """llava-hf/llava-1.5-7b-hf in miniature (``LlavaForConditionalGeneration``): CLIP
    ViT-L/14-336 (576 image tokens, penultimate layer, CLS dropped), the mlp2x_gelu
    projector, a Vicuna-style LM (``<s>``/``</s>``, 4,096 context) with ``<image>`` added,
    and the "USER: <image>\n... ASSISTANT:" chat template. Weights are saved under the hub
    checkpoint's names (``vision_tower.vision_model.*``, ``language_model.model.*``), as
    vLLM and older loaders read them."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(
        [*SENTENCEPIECE_SPECIALS, "<image>"],
        LLAVA15_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        image_token="<image>",
    )
    text = _llama_config(
        tokenizer,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_TEMPLATE,
        image_token="<image>",
    )
    with atomic_dir(out_dir) as tmp:
        save_llava(model, tmp)
        processor.save_pretrained(tmp)


def build_clip(out_dir: str | Path, seed: int, image_size: int = 336, layers: int = 8) -> None:
    """OpenAI CLIP ViT-L/14 (224 or 336 px) in miniature: a full ``CLIPModel`` (text and
    vision halves, as the hub repos hold) with 14-px patches, and the published image
    processor (shortest edge resized to the image size, centre crop, CLIP mean/std)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 512,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
        },
        projection_dim=32,
    )
    model = CLIPModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def build_qwen2vl_instruct(out_dir: str | Path, seed: int) -> None:
    """Qwen2-VL-7B-Instruct in miniature: 14-px patches merged 2x2 (one token per 28x28
    pixels), two frames per temporal patch, the published pixel budget (min 56x56, max
    3584x3584 pixels), M-RoPE split 1:1.5:1.5 over time, height and width as the real
    [16, 24, 24], ChatML turns closed by ``<|im_end|>``, no BOS, ``<|endoftext|>`` pad."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(
        QWEN_SPECIALS,
        QWEN2VL_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        image_token="<|image_pad|>",
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "num_heads": 2,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            # head_dim 32: the rotary half (16) split over time, height and width.
            "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    pixels: dict[str, Any] = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    budget: dict[str, Any] = {"min_pixels": 56 * 56, "max_pixels": 3584 * 3584}
    norm: dict[str, Any] = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, **budget, **norm),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels, **budget, **norm),
        chat_template=QWEN2VL_TEMPLATE,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def build_internvl3_hf(out_dir: str | Path, seed: int) -> None:
    """InternVL3-8B-hf in miniature (``InternVLForConditionalGeneration``, the
    transformers-native conversion): 448-px tiles of 14-px patches, up to 12 tiles chosen by
    aspect ratio plus a thumbnail, ImageNet mean/std, pixel shuffle 0.5 (256 tokens per
    tile between ``<img>`` and ``</img>``), a Qwen2 language model with ChatML turns closed
    by ``<|im_end|>``."""
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
    markers: dict[str, Any] = {"start_image_token": "<img>", "end_image_token": "</img>"}
    markers |= {"context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    template = QWEN2VL_TEMPLATE.replace(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", ""
    ).replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
    tokenizer = bpe_tokenizer(
        [*QWEN_SPECIALS[:3], *markers.values()],
        template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **markers,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[448, 448],
            patch_size=[14, 14],
        ),
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        image_token_id=ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    size = {"height": 448, "width": 448}
    imagenet: dict[str, Any] = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, crop_to_patches=True, min_patches=1, max_patches=12, **imagenet
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size, **imagenet),
        image_seq_length=256,
        chat_template=template,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def _save(out_dir: str | Path, model: Any, tokenizer: Any) -> None:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# The real checkpoints the presets name, and the builder of each one's miniature.
MINIATURES: dict[str, Callable[[Path, int], None]] = {
    "openai/clip-vit-large-patch14-336": lambda out, seed: build_clip(out, seed, 336),
    "llava-hf/llava-1.5-7b-hf": build_llava15_hf,
    "openai/clip-vit-large-patch14": lambda out, seed: build_clip(out, seed, 224),
    "lmsys/vicuna-7b-v1.5": lambda out, seed: build_llama2(out, seed),
    "meta-llama/Llama-2-7b-hf": lambda out, seed: build_llama2(out, seed, layers=8),
    "meta-llama/Meta-Llama-3-8B-Instruct": build_llama3_instruct,
    "Qwen/Qwen2-VL-7B-Instruct": build_qwen2vl_instruct,
    "OpenGVLab/InternVL3-8B-hf": build_internvl3_hf,
    internvl_chat.V15_REPO: internvl_minis.build_mini_internvl_chat_v15,
}


def snapshot_dir(cache: str | Path, repo_id: str, revision: str) -> Path:
    """``<cache>/models--org--name/snapshots/<revision>``, the hub cache's layout."""
    return Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision


def install(reference: str, cache: str | Path, seed: int = 0) -> Path:
    """Build the miniature of a pinned hub reference (``org/name@<commit>``) into the hub
    cache ``cache`` at that commit, with ``refs/main`` pointing at it."""
    repo_id, revision = split_revision(reference)
    if repo_id not in MINIATURES:
        raise ValueError(f"no miniature of {repo_id!r}; known: {', '.join(sorted(MINIATURES))}")
    if revision is None or not COMMIT.match(revision):
        raise ValueError(f"{reference!r}: a miniature needs a revision pinned to a commit")
    folder = snapshot_dir(cache, repo_id, revision)
    if not (folder / "config.json").is_file():
        MINIATURES[repo_id](folder, seed)
    refs = folder.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(revision, encoding="utf-8")
    return folder


def hub_references(models: dict[str, Any]) -> list[str]:
    """The hub references among a config's ``models`` entries."""
    return [
        value
        for key, value in models.items()
        if isinstance(value, str) and key != "similarity_encoder" and is_hub_id(value)
    ]


def install_for_configs(configs: Iterable[str | Path], cache: str | Path) -> list[Path]:
    """Install the miniature of every hub model the config files name."""
    import yaml

    folders = []
    for path in configs:
        with open(path, encoding="utf-8") as handle:
            models = (yaml.safe_load(handle) or {}).get("models", {})
        folders += [install(reference, cache) for reference in hub_references(models)]
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmflow miniatures",
        description="Write tiny random stand-ins of the hub models a config names into a "
        "separate Hugging Face hub cache, at the pinned revisions, to try a preset offline "
        "(HF_HUB_CACHE=DIR snakemake --configfile ... -n all).",
    )
    parser.add_argument("--configfile", nargs="+", required=True, help="config files")
    parser.add_argument("--cache", required=True, help="a hub cache folder of its own")
    args = parser.parse_args(argv)
    from huggingface_hub import constants

    # Stand-ins at the real commits would shadow the real weights in the real cache.
    if Path(args.cache).resolve() == Path(constants.HF_HUB_CACHE).resolve():
        parser.error(f"--cache {args.cache} is the real hub cache; give a folder of its own")
    for folder in install_for_configs(args.configfile, args.cache):
        print(folder)
    return 0
