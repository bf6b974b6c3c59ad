"""The InternVL chat family in miniature: tiny random model folders with the published
layouts, for the tests and the presets' miniatures.

``build_mini_internvl_chat`` writes an InternVL2-style chat model (InternViT + MLP + a
Llama) with remote code written for vlmflow (vlmflow.families.remote_code.internvl_chat),
which loads on the hf backend; ``build_mini_internvl_chat_v15`` writes
InternVL-Chat-V1.5's layout (InternViT with RMS and q/k norms, pixel shuffle, InternLM2
with a packed ``wqkv``), which vLLM serves with its own implementation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vlmflow.core.io import atomic_dir
from vlmflow.demo.demo_models import DEMO_HEAD_DIM, tiny_llama_config, train_demo_tokenizer
from vlmflow.families.internvl_chat import (
    ARCHITECTURE,
    AUTO_MAP,
    CHATML_TEMPLATE,
    DEFAULT_MAX_TILES,
    DEFAULT_TILE_SIZE,
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    INTERNLM2,
    REMOTE_CODE,
    REMOTE_FILES,
    V15_FILES,
)

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
    """The packaged remote code, imported as the package vlmflow.families.remote_code.internvl_chat
    (its relative import of the configuration module needs a package)."""
    import importlib

    package = "vlmflow.families.remote_code.internvl_chat"
    return _RemoteModules(
        importlib.import_module(f"{package}.configuration_internvl_chat"),
        importlib.import_module(f"{package}.modeling_internvl_chat"),
    )


# ---------------------------------------------------------------------------
# InternVL-Chat-V1.5 in miniature (InternViT + MLP + InternLM2)
# ---------------------------------------------------------------------------


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
