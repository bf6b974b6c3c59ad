"""The InternVL chat-model family (InternVL-Chat-V1.5, InternVL2, InternVL2.5) as a
caption model.

These checkpoints ship their own modelling code (``"architectures":
["InternVLChatModel"]``, an ``auto_map`` to ``modeling_internvl_chat.InternVLChatModel``)
and no transformers processor: they load with ``AutoModel`` + ``AutoTokenizer`` and
``trust_remote_code=True``, images are tiled here as the model cards do, and captions come
from the model's own ``batch_chat``. (The ``-hf`` conversions, e.g.
``OpenGVLab/InternVL3-8B-hf``, are transformers-native and take the caption stage's
``AutoModelForImageTextToText`` route instead.)

Dynamic resolution, as published: each image is resized to the grid of ``tile_size``
tiles (at most ``max_tiles``) whose aspect ratio is closest to its own, cut into those
tiles and, when there is more than one, followed by a thumbnail of the whole image.

Remote code written for vlmflow (``remote_code/internvl_chat`` beside this file) serves
the family's miniatures (vlmflow.demo.internvl_minis).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from vlmflow.core.models import (
    cached_file,
    is_hub_id,
    pretrained,
    split_revision,
)

if TYPE_CHECKING:
    import torch

    from vlmflow.core.shards import Sample


class CaptionSettings(Protocol):
    """What the family reads of the caption stage's settings (vlmflow.stages.caption)."""

    @property
    def model(self) -> str: ...

    @property
    def prompt(self) -> str: ...

    @property
    def trust_remote_code(self) -> bool: ...

    @property
    def max_tiles(self) -> int | None: ...

    def load_pretrained(self, auto_class: Any) -> Any: ...

    def generation_kwargs(self) -> dict[str, Any]: ...


ARCHITECTURE = "InternVLChatModel"
INTERNLM2 = "InternLM2ForCausalLM"
# config.json's auto_map of the family's checkpoints.
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# The seed's captioner.
V15_REPO = "OpenGVLab/InternVL-Chat-V1-5"
REMOTE_CODE = Path(__file__).resolve().parent / "remote_code" / "internvl_chat"
# The configuration classes every miniature of the family ships (InternViT, InternLM2 and
# the chat model's), then what each kind adds: vlmflow's modeling file (the transformers
# route) or InternLM2's tokenizer class (InternVL-Chat-V1.5, served by vLLM's own model).
CONFIG_FILES = (
    "configuration_internvl_chat.py",
    "configuration_intern_vit.py",
    "configuration_internlm2.py",
)
REMOTE_FILES = (*CONFIG_FILES, "modeling_internvl_chat.py")
V15_FILES = (*CONFIG_FILES, "tokenization_internlm2_fast.py")

# The model cards' preprocessing: ImageNet normalisation, bicubic resizes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The cards' tile budget (max_num) when caption.max_tiles is unset.
DEFAULT_MAX_TILES = 12
DEFAULT_TILE_SIZE = 448

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML, the format of the family's internlm2-chat / Hermes-2 / internvl2_5 templates.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------
# Recognising the family
# ---------------------------------------------------------------------------


def is_internvl_chat(config: dict[str, Any] | str | Path | Any) -> bool:
    """True for a config of the chat-model family: a config.json dict, a model folder or
    a config.json path, or a loaded config object."""
    if isinstance(config, str | Path):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            return False
        config = json.loads(path.read_text())
    if isinstance(config, dict):
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
    else:
        architectures = getattr(config, "architectures", None) or []
        model_type = getattr(config, "model_type", None)
    return ARCHITECTURE in architectures or model_type == "internvl_chat"


def read_config(reference: str) -> dict[str, Any] | None:
    """config.json of a model folder or of a cached hub model; None where it is not on
    this machine."""
    if not Path(split_revision(reference)[0]).is_dir() and not is_hub_id(reference):
        return None
    path = cached_file(reference, "config.json")
    return json.loads(path.read_text()) if path is not None else None


def is_chat_model(model: Any) -> bool:
    """True for a loaded model of the family (captioned through its ``batch_chat``)."""
    return hasattr(model, "batch_chat") and is_internvl_chat(getattr(model, "config", None))


def remote_code_refusal(reference: str) -> str:
    return (
        f"models.vlm {reference!r} is an InternVL chat model (InternVLChatModel), which runs "
        "its own Python code from the model repository; set models.trust_remote_code: true "
        "to allow that, or use a transformers-native -hf conversion (such as "
        "OpenGVLab/InternVL3-8B-hf) that needs no remote code"
    )


# What transformers 5 does with the remote code of the published checkpoints (checked
# with transformers 5.23 on OpenGVLab/InternVL's own modeling files and tiny configs).
INTERNLM2_ERROR = "AttributeError: 'InternLM2ForCausalLM' object has no attribute 'generate'"
NO_POST_INIT_ERROR = (
    "AttributeError: 'InternVLChatModel' object has no attribute 'all_tied_weights_keys'"
)
WORKING_ROUTES = (
    "use caption.backend: vllm (vLLM runs this family with its own implementation; "
    "config/presets/rovi_v15.yaml), or a transformers-native -hf conversion on the "
    "image-text-to-text route (e.g. "
    "OpenGVLab/InternVL3-8B-hf@259a3b64a14623c0ec91a045cb43f7c5af5fa6af with "
    "models.trust_remote_code: false), or a chat model of this family whose language "
    "model transformers ships (Llama, Qwen2) with current remote code"
)


def remote_code_blocker(reference: str, config: dict[str, Any]) -> str | None:
    """Why transformers 5 cannot run this chat model's remote code, or None.

    - InternLM2 language models (InternVL-Chat-V1.5, InternVL2-8B/26B, InternVL2.5-8B/26B):
      ``InternLM2ForCausalLM`` does not inherit ``GenerationMixin``, which transformers 5
      no longer gives every model, so ``batch_chat`` fails in ``language_model.generate``;
    - modeling code older than InternVL's 2025-08 fix, whose model never calls
      ``post_init()``: ``from_pretrained`` fails before any weight is read.
    """
    llm = (config.get("llm_config") or {}).get("architectures") or []
    if INTERNLM2 in llm:
        return (
            f"models.vlm {reference!r}: transformers 5 cannot run this model's remote code: "
            f"its language model is InternLM2, and batch_chat fails with {INTERNLM2_ERROR} "
            f"(InternLM2's code does not inherit GenerationMixin); {WORKING_ROUTES}"
        )
    modeling = cached_file(reference, "modeling_internvl_chat.py")
    if modeling is not None and "post_init()" not in modeling.read_text(encoding="utf-8"):
        return (
            f"models.vlm {reference!r}: transformers 5 cannot load this model's remote code "
            f"(its model never calls post_init()): from_pretrained fails with "
            f"{NO_POST_INIT_ERROR}; {WORKING_ROUTES}"
        )
    return None


# The end-of-turn token of each conversation template the family's configs name.
TURN_ENDS = {
    "internlm2-chat": IM_END,
    "Hermes-2": IM_END,
    "internvl2_5": IM_END,
    "phi3-chat": "<|end|>",
}


def turn_end_ids(reference: str, tokenizer: Any) -> list[int]:
    """The id of the end of a chat turn in the model's template (``batch_chat`` stops
    there, whatever generation_config.json says); empty where the template is unknown."""
    config = read_config(reference) or {}
    token = TURN_ENDS.get(config.get("template") or "")
    if token is None or token not in tokenizer.get_vocab():
        return []
    return [int(tokenizer.convert_tokens_to_ids(token))]


def vllm_engine_options(max_tiles: int | None) -> dict[str, Any]:
    """vLLM engine arguments for the family: ``caption.max_tiles`` as the processor's
    ``max_dynamic_patch`` (None: the model's own, from its config.json)."""
    if max_tiles is None:
        return {}
    if max_tiles < 1:
        raise ValueError(f"caption.max_tiles must be at least 1, got {max_tiles}")
    return {"mm_processor_kwargs": {"max_dynamic_patch": max_tiles}}


# ---------------------------------------------------------------------------
# Dynamic tiling
# ---------------------------------------------------------------------------


def tile_grid(
    width: int, height: int, tile_size: int, max_tiles: int, min_tiles: int = 1
) -> tuple[int, int]:
    """(columns, rows) of the tile grid for a ``width`` x ``height`` image.

    Among all grids of ``min_tiles`` to ``max_tiles`` tiles, the one whose aspect ratio
    is closest to the image's; of grids with the same ratio (1x1, 2x2, ...), the larger
    one is taken while the image covers more than half of its pixels.
    """
    if max_tiles < min_tiles or min_tiles < 1:
        raise ValueError(f"tile budget {min_tiles}..{max_tiles}: need 1 <= min <= max")
    grids = sorted(
        ((cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)),
        key=lambda grid: (grid[0] * grid[1], grid),
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        if not min_tiles <= cols * rows <= max_tiles:
            continue
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image,
    tile_size: int = DEFAULT_TILE_SIZE,
    max_tiles: int = DEFAULT_MAX_TILES,
    use_thumbnail: bool = True,
    min_tiles: int = 1,
) -> list[Image.Image]:
    """The ``tile_size`` square tiles of ``image`` (row by row), plus a thumbnail of the
    whole image when there is more than one tile and ``use_thumbnail``."""
    cols, rows = tile_grid(image.width, image.height, tile_size, max_tiles, min_tiles)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((x * tile_size, y * tile_size, (x + 1) * tile_size, (y + 1) * tile_size))
        for y in range(rows)
        for x in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def to_tensor(tile: Image.Image, tile_size: int) -> torch.Tensor:
    """A tile as a normalised (3, tile_size, tile_size) float tensor."""
    import numpy as np
    import torch

    rgb = tile.convert("RGB")
    if rgb.size != (tile_size, tile_size):
        rgb = rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array - mean) / std


def pixel_batch(
    images: Sequence[Image.Image],
    tile_size: int = DEFAULT_TILE_SIZE,
    max_tiles: int = DEFAULT_MAX_TILES,
    use_thumbnail: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """``pixel_values`` (all images' tiles, (sum tiles, 3, tile_size, tile_size)) and
    ``num_patches_list`` (the tiles of each image), as ``batch_chat`` takes them."""
    import torch

    tensors: list[torch.Tensor] = []
    num_patches_list: list[int] = []
    for image in images:
        tiles = dynamic_tiles(image, tile_size, max_tiles, use_thumbnail)
        tensors.extend(to_tensor(tile, tile_size) for tile in tiles)
        num_patches_list.append(len(tiles))
    pixel_values = torch.stack(tensors)
    return (pixel_values.to(dtype) if dtype is not None else pixel_values), num_patches_list


def tile_settings(config: Any) -> tuple[int, bool]:
    """(tile size, use_thumbnail) from a loaded model's config."""
    size = getattr(config, "force_image_size", None)
    if not size:
        size = config.vision_config.image_size
        size = size[0] if isinstance(size, list | tuple) else size
    use_thumbnail = bool(getattr(config, "use_thumbnail", False))
    return int(size), use_thumbnail


def max_tiles_of(config: Any, settings: CaptionSettings) -> int:
    """caption.max_tiles, else the model cards' 12; 1 when the model has no dynamic
    resolution."""
    if not getattr(config, "dynamic_image_size", True):
        return 1
    return DEFAULT_MAX_TILES if settings.max_tiles is None else settings.max_tiles


# ---------------------------------------------------------------------------
# Loading and captioning
# ---------------------------------------------------------------------------


def load(settings: CaptionSettings) -> tuple[Any, Any]:
    """(tokenizer, model) of an InternVL chat model, through its remote code."""
    if not settings.trust_remote_code:
        raise ValueError(remote_code_refusal(settings.model))
    if settings.max_tiles is not None and settings.max_tiles < 1:
        raise ValueError(f"caption.max_tiles must be at least 1, got {settings.max_tiles}")
    from transformers import AutoModel, AutoTokenizer

    model = settings.load_pretrained(AutoModel)
    tokenizer = AutoTokenizer.from_pretrained(**pretrained(settings.model, trust_remote_code=True))
    apply_generation_defaults(model, settings.model)
    return tokenizer, model


def apply_generation_defaults(model: Any, reference: str) -> None:
    """The folder's generation_config.json, on the language model that generates.

    The family's remote model class is no transformers generation model, so
    ``from_pretrained`` does not read the file; its settings (here: the miniature's
    sequence bias) are what the model's authors set for generation.
    """
    path = cached_file(reference, "generation_config.json")
    language_model = getattr(model, "language_model", None)
    if path is None or language_model is None:
        return
    from transformers import GenerationConfig

    defaults = GenerationConfig.from_pretrained(str(path.parent)).to_diff_dict()
    defaults.pop("transformers_version", None)
    if defaults:
        language_model.generation_config.update(**defaults)


def caption_batch(
    tokenizer: Any, model: Any, samples: list[Sample], settings: CaptionSettings
) -> list[str]:
    """One caption per sample through ``model.batch_chat``, as the model cards call it."""
    import torch

    tile_size, use_thumbnail = tile_settings(model.config)
    pixel_values, num_patches_list = pixel_batch(
        [sample.image() for sample in samples],
        tile_size,
        max_tiles_of(model.config, settings),
        use_thumbnail,
        dtype=model.dtype,
    )
    questions = ["<image>\n" + settings.prompt] * len(samples)
    with torch.inference_mode():
        answers = model.batch_chat(
            tokenizer,
            pixel_values.to(model.device),
            num_patches_list=num_patches_list,
            questions=questions,
            generation_config=settings.generation_kwargs(),
        )
    return [answer.strip() for answer in answers]
