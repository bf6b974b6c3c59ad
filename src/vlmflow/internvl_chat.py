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

``build_mini_internvl_chat`` writes a tiny random model folder of the family, with
remote code written for vlmflow (``vlmflow/remote_code/internvl_chat``), for the tests
and the miniatures.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlmflow.demo_models import DEMO_HEAD_DIM, tiny_llama_config, train_demo_tokenizer
from vlmflow.io import atomic_dir
from vlmflow.models import (
    cached_file,
    is_hub_id,
    pretrained,
    split_revision,
)

if TYPE_CHECKING:
    import torch

    from vlmflow.caption import CaptionSettings
    from vlmflow.shards import Sample

ARCHITECTURE = "InternVLChatModel"
INTERNLM2 = "InternLM2ForCausalLM"
# config.json's auto_map of the family's checkpoints.
AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
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


# ---------------------------------------------------------------------------
# The miniature
# ---------------------------------------------------------------------------


def _chat_tokenizer() -> Any:
    """The demo tokenizer with ChatML turns and InternVL's image markers."""
    return train_demo_tokenizer(
        extra_tokens=(IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT),
        chat_template=CHATML_TEMPLATE,
        named_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
        },
    )


def build_mini_internvl_chat(
    out_dir: str | Path,
    seed: int,
    *,
    image_size: int = 448,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    max_dynamic_patch: int = 12,
    template: str = "internlm2-chat",
    vision_hidden_size: int = 32,
    llm_hidden_size: int = 32,
    layers: int = 2,
    delimiter_bias: float | None = 2.5,
) -> None:
    """A tiny random InternVL chat model folder: config.json with the family's fields and
    ``auto_map``, safetensors weights, a ChatML tokenizer with the image markers,
    generation_config.json stopping at ``<|im_end|>``, and the remote code."""
    import torch
    from transformers import GenerationConfig, InternVLVisionConfig

    torch.manual_seed(seed)
    tokenizer = _chat_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    stop_ids = [ids(IM_END), tokenizer.eos_token_id]
    llm_config = tiny_llama_config(
        tokenizer,
        llm_hidden_size,
        layers,
        stop_ids=stop_ids,
        context=8192,
        architectures=["LlamaForCausalLM"],
    )
    vision_config = InternVLVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    module = _remote_modules()
    config = module.configuration.InternVLChatConfig(
        vision_config=vision_config.to_dict(),
        llm_config=llm_config.to_dict(),
        select_layer=-1,
        force_image_size=image_size,
        downsample_ratio=downsample_ratio,
        template=template,
        dynamic_image_size=True,
        use_thumbnail=True,
        ps_version="v2",
        min_dynamic_patch=1,
        max_dynamic_patch=max_dynamic_patch,
        architectures=[ARCHITECTURE],
    )
    config.auto_map = dict(AUTO_MAP)
    model = module.modeling.InternVLChatModel(config)
    generation = GenerationConfig(
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if delimiter_bias is not None:
        # As build_demo_llm: tilt the random text toward list delimiters (see there).
        generation.sequence_bias = [[[ids(token)], delimiter_bias] for token in (",", "\u010a")]
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_CODE / name, tmp / name)
        # save_pretrained writes what the instance holds; make sure config.json names the
        # family exactly as the published checkpoints do.
        written = json.loads((tmp / "config.json").read_text())
        written.update(architectures=[ARCHITECTURE], auto_map=config.auto_map)
        (tmp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


class _RemoteModules:
    def __init__(self, configuration: Any, modeling: Any) -> None:
        self.configuration = configuration
        self.modeling = modeling


def _remote_modules() -> _RemoteModules:
    """The packaged remote code, imported as the package vlmflow.remote_code.internvl_chat
    (its relative import of the configuration module needs a package)."""
    import importlib

    package = "vlmflow.remote_code.internvl_chat"
    return _RemoteModules(
        importlib.import_module(f"{package}.configuration_internvl_chat"),
        importlib.import_module(f"{package}.modeling_internvl_chat"),
    )


# ---------------------------------------------------------------------------
# InternVL-Chat-V1.5 in miniature (InternViT + MLP + InternLM2)
# ---------------------------------------------------------------------------

V15_REPO = "OpenGVLab/InternVL-Chat-V1-5"


def v15_config(
    tokenizer: Any,
    *,
    vision_hidden_size: int,
    llm_hidden_size: int,
    layers: int,
    max_dynamic_patch: int = DEFAULT_MAX_TILES,
    context: int = 32768,
) -> dict[str, Any]:
    """config.json of an InternVL-Chat-V1.5-shaped model: InternViT (RMS norms, q/k
    normalisation, no qkv bias, 448-px tiles of 14-px patches), pixel shuffle v2 to 256
    tokens per tile, InternLM2 with grouped-query attention and a 32K context, the
    internlm2-chat template and dynamic tiles (12 by default) with a thumbnail, as the
    published config.json."""
    head_dim = DEMO_HEAD_DIM  # vLLM's CPU attention takes 32 and more
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 4,
        "num_attention_heads": vision_hidden_size // head_dim,
        "num_hidden_layers": layers,
        "image_size": DEFAULT_TILE_SIZE,
        "patch_size": 14,
        "qkv_bias": False,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
    }
    heads = llm_hidden_size // head_dim
    stop_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    llm = {
        "architectures": [INTERNLM2],
        "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "vocab_size": len(tokenizer),
        "hidden_size": llm_hidden_size,
        "intermediate_size": llm_hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "bias": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "internvl_chat",
        "auto_map": AUTO_MAP,
        "vision_config": vision,
        "llm_config": llm,
        "select_layer": -1,
        "force_image_size": DEFAULT_TILE_SIZE,
        "downsample_ratio": 0.5,
        "template": "internlm2-chat",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "ps_version": "v2",
        "min_dynamic_patch": 1,
        "max_dynamic_patch": max_dynamic_patch,
        "torch_dtype": "float32",
    }


def v15_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the published checkpoint's names: ``vision_model.*``
    (InternViT), ``mlp1.*`` (the projector) and ``language_model.*`` (InternLM2, whose
    ``wqkv`` packs each KV head's queries, key and value)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    vision, llm = config["vision_config"], config["llm_config"]
    weights = _intern_vit_weights(vision, normal)
    folded = vision["hidden_size"] * int(1 / config["downsample_ratio"]) ** 2
    hidden = llm["hidden_size"]
    weights |= {
        "mlp1.0.weight": torch.ones(folded),
        "mlp1.0.bias": torch.zeros(folded),
        "mlp1.1.weight": normal(hidden, folded),
        "mlp1.1.bias": torch.zeros(hidden),
        "mlp1.3.weight": normal(hidden, hidden),
        "mlp1.3.bias": torch.zeros(hidden),
    }
    weights |= {f"language_model.{k}": v for k, v in _internlm2_weights(llm, normal).items()}
    return weights


def _intern_vit_weights(vision: dict[str, Any], normal: Any) -> dict[str, torch.Tensor]:
    import torch

    width, inner = vision["hidden_size"], vision["intermediate_size"]
    patch = vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    weights = {
        "vision_model.embeddings.class_embedding": normal(1, 1, width),
        "vision_model.embeddings.patch_embedding.weight": normal(width, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": torch.zeros(width),
        "vision_model.embeddings.position_embedding": normal(1, positions, width),
    }
    scale = vision["initializer_factor"]
    for i in range(vision["num_hidden_layers"]):
        layer = f"vision_model.encoder.layers.{i}"
        weights |= {
            f"{layer}.attn.qkv.weight": normal(3 * width, width),
            f"{layer}.attn.q_norm.weight": torch.ones(width),
            f"{layer}.attn.k_norm.weight": torch.ones(width),
            f"{layer}.attn.proj.weight": normal(width, width),
            f"{layer}.attn.proj.bias": torch.zeros(width),
            f"{layer}.mlp.fc1.weight": normal(inner, width),
            f"{layer}.mlp.fc1.bias": torch.zeros(inner),
            f"{layer}.mlp.fc2.weight": normal(width, inner),
            f"{layer}.mlp.fc2.bias": torch.zeros(width),
            f"{layer}.norm1.weight": torch.ones(width),
            f"{layer}.norm2.weight": torch.ones(width),
            f"{layer}.ls1": torch.full((width,), scale),
            f"{layer}.ls2": torch.full((width,), scale),
        }
    return weights


def _internlm2_weights(llm: dict[str, Any], normal: Any) -> dict[str, torch.Tensor]:
    import torch

    hidden, inner, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    head_dim = hidden // llm["num_attention_heads"]
    qkv_rows = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * head_dim
    weights = {
        "model.tok_embeddings.weight": normal(vocab, hidden),
        "model.norm.weight": torch.ones(hidden),
        "output.weight": normal(vocab, hidden),
    }
    for i in range(llm["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        weights |= {
            f"{layer}.attention.wqkv.weight": normal(qkv_rows, hidden),
            f"{layer}.attention.wo.weight": normal(hidden, hidden),
            f"{layer}.feed_forward.w1.weight": normal(inner, hidden),
            f"{layer}.feed_forward.w3.weight": normal(inner, hidden),
            f"{layer}.feed_forward.w2.weight": normal(hidden, inner),
            f"{layer}.attention_norm.weight": torch.ones(hidden),
            f"{layer}.ffn_norm.weight": torch.ones(hidden),
        }
    return weights


def build_mini_internvl_chat_v15(
    out_dir: str | Path,
    seed: int,
    *,
    vision_hidden_size: int = 64,
    llm_hidden_size: int = 64,
    layers: int = 2,
) -> None:
    """A tiny random InternVL-Chat-V1.5 folder as the hub ships it: config.json (the
    family's remote configuration classes), ``model.safetensors`` under the published
    names, InternLM2's tokenizer class (remote code) with ChatML turns and the image
    markers, and generation_config.json stopping at ``<|im_end|>``. Its language model
    is InternLM2, so it captions on ``caption.backend: vllm`` only (as the real one)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tokenizer = _chat_tokenizer()
    config = v15_config(
        tokenizer,
        vision_hidden_size=vision_hidden_size,
        llm_hidden_size=llm_hidden_size,
        layers=layers,
    )
    llm = config["llm_config"]
    generation = GenerationConfig(
        eos_token_id=llm["eos_token_id"],
        pad_token_id=llm["pad_token_id"],
        bos_token_id=llm["bos_token_id"],
    )
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(v15_weights(config, seed), str(tmp / "model.safetensors"))
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _as_internlm2_tokenizer(tmp / "tokenizer_config.json")
        for name in V15_FILES:
            shutil.copyfile(REMOTE_CODE / name, tmp / name)


def _as_internlm2_tokenizer(path: Path) -> None:
    """Name InternLM2's tokenizer class (remote code) in tokenizer_config.json."""
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "InternLM2TokenizerFast"
    settings["auto_map"] = {
        "AutoTokenizer": [None, "tokenization_internlm2_fast.InternLM2TokenizerFast"]
    }
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
