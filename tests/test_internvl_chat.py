"""The InternVL chat-model route of the caption stage (InternVL-Chat-V1.5 / InternVL2 /
2.5: remote code, dynamic tiling, ``batch_chat``) with a tiny random model of the family."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlmflow.core.shards import iter_samples
from vlmflow.demo import internvl_minis
from vlmflow.demo.internvl_minis import build_mini_internvl_chat
from vlmflow.families import internvl_chat
from vlmflow.families.internvl_chat import (
    dynamic_tiles,
    is_internvl_chat,
    pixel_batch,
    tile_grid,
)
from vlmflow.stages import caption
from vlmflow.stages.caption import CaptionSettings

PROMPT = "Describe this image in two plain sentences."
KEYS = [f"k{n:03d}" for n in range(5)]


@pytest.fixture(scope="module")
def mini_chat(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("internvl-chat") / "mini-internvl-chat"
    build_mini_internvl_chat(folder, 0, max_dynamic_patch=4)
    return str(folder)


def chat_settings(model: str, **changes: Any) -> CaptionSettings:
    settings = CaptionSettings(
        model=model,
        prompt=PROMPT,
        max_new_tokens=6,
        batch_size=2,
        max_tiles=2,
        trust_remote_code=True,
    )
    return replace(settings, **changes)


# ---------------------------------------------------------------------------
# Dynamic tiling
# ---------------------------------------------------------------------------


def test_grid_follows_the_aspect_ratio() -> None:
    assert tile_grid(896, 448, 448, 12) == (2, 1)  # wide: two columns
    assert tile_grid(448, 1344, 448, 12) == (1, 3)  # tall: three rows
    assert tile_grid(1200, 200, 448, 4) == (4, 1)  # 6:1 panorama, capped at 4 tiles
    # Square: the same 1:1 ratio at 1, 4, 9 tiles; a larger grid only while the image
    # covers more than half of its pixels.
    assert tile_grid(448, 448, 448, 12) == (1, 1)
    assert tile_grid(700, 700, 448, 12) == (2, 2)
    assert tile_grid(1000, 1000, 448, 12) == (3, 3)
    assert tile_grid(1000, 1000, 448, 4) == (2, 2)
    with pytest.raises(ValueError, match="tile budget"):
        tile_grid(10, 10, 448, 0)


@pytest.mark.parametrize(
    ("size", "max_tiles", "grid"),
    [((900, 300), 12, 3), ((300, 900), 12, 3), ((1000, 1000), 12, 9), ((1000, 1000), 1, 1)],
)
def test_tiles_and_thumbnail(size: tuple[int, int], max_tiles: int, grid: int) -> None:
    image = Image.new("RGB", size, (10, 120, 240))
    tiles = dynamic_tiles(image, 448, max_tiles, use_thumbnail=True)
    # A thumbnail of the whole image follows the tiles only when there is more than one.
    assert len(tiles) == (grid + 1 if grid > 1 else 1)
    assert grid <= max_tiles
    assert all(tile.size == (448, 448) for tile in tiles)
    assert len(dynamic_tiles(image, 448, max_tiles, use_thumbnail=False)) == grid


def test_tiles_are_cut_row_by_row_from_the_resized_image() -> None:
    image = Image.new("RGB", (896, 448), (255, 0, 0))
    image.paste((0, 0, 255), (448, 0, 896, 448))  # right half blue
    left, right, thumbnail = dynamic_tiles(image, 448, 12, use_thumbnail=True)
    assert left.getpixel((200, 200)) == (255, 0, 0)
    assert right.getpixel((200, 200)) == (0, 0, 255)
    assert thumbnail.getpixel((10, 200)) == (255, 0, 0)


def test_pixel_batch_concatenates_every_images_tiles() -> None:
    images = [
        Image.new("RGB", (40, 30), (255, 255, 255)),  # 4:3 -> 1x1 with a budget of 2
        Image.new("RGB", (68, 30), (0, 0, 0)),  # 2.3:1 -> 2x1 + thumbnail
        Image.new("RGB", (30, 90), (0, 0, 0)),  # 1:3 -> 1x3 + thumbnail (budget 4)
    ]
    pixels, counts = pixel_batch(images[:2], 448, 2, True, dtype=torch.bfloat16)
    assert counts == [1, 3]
    assert pixels.shape == (4, 3, 448, 448)
    assert pixels.dtype == torch.bfloat16
    pixels, counts = pixel_batch(images, 448, 4, True)
    assert counts == [1, 3, 4]
    assert pixels.shape == (8, 3, 448, 448)
    # ImageNet normalisation: white is (1 - mean) / std per channel.
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(pixels[0, :, 0, 0], expected, atol=1e-5)


# ---------------------------------------------------------------------------
# Route choice
# ---------------------------------------------------------------------------


def test_route_of_each_kind_of_model_folder(
    mini_chat: str, demo_models: dict[str, str], tmp_path: Path
) -> None:
    assert is_internvl_chat(mini_chat)
    assert caption.vlm_route(mini_chat, trust_remote_code=True) == "internvl_chat"
    with pytest.raises(ValueError, match=r"models\.trust_remote_code: true") as refused:
        caption.vlm_route(mini_chat, trust_remote_code=False)
    assert "InternVL3-8B-hf" in str(refused.value)
    assert caption.vlm_route(demo_models["vlm"], trust_remote_code=False) == "image_text_to_text"
    assert caption.vlm_route(demo_models["internvl"], False) == "image_text_to_text"
    assert not is_internvl_chat(demo_models["internvl"])  # the -hf style native port

    unknown = tmp_path / "bert"
    unknown.mkdir()
    (unknown / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "model_type": "bert"})
    )
    with pytest.raises(ValueError, match=r"models\.vlm .* BertModel.*InternVLChatModel"):
        caption.vlm_route(str(unknown), trust_remote_code=True)
    # Not on this machine (uncached hub model, missing folder): decided at load time.
    assert caption.vlm_route("nobody/not-a-cached-model", True) is None
    assert caption.vlm_route(str(tmp_path / "missing"), True) is None


def test_chat_model_without_remote_code_is_a_config_error(
    mini_chat: str, shard_tar: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=r"models\.trust_remote_code"):
        caption.run(shard_tar, out, chat_settings(mini_chat, trust_remote_code=False), "000000")
    assert not out.exists()


# ---------------------------------------------------------------------------
# Loading and captioning
# ---------------------------------------------------------------------------


def test_miniature_loads_through_automodel_with_remote_code(mini_chat: str) -> None:
    config = json.loads((Path(mini_chat) / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    assert config["force_image_size"] == 448 and config["ps_version"] == "v2"
    generation = json.loads((Path(mini_chat) / "generation_config.json").read_text())
    tokenizer, model = caption.load_vlm(chat_settings(mini_chat))
    assert type(model).__name__ == "InternVLChatModel"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's code
    assert model.num_image_token == 256  # (448 / 14)^2 patches, pixel-shuffled by 0.5
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    features = model.extract_feature(torch.zeros(2, 3, 448, 448))
    assert features.shape == (2, 256, model.config.llm_config.hidden_size)


def test_chat_model_captions_a_shard(mini_chat: str, shard_tar: Path, tmp_path: Path) -> None:
    settings = chat_settings(mini_chat)
    out = tmp_path / "a.parquet"
    assert caption.run(shard_tar, out, settings, "000000") == {"in": 5, "ok": 5, "failed": 0}
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == KEYS
    web = {s.key: s.web_caption for s in iter_samples(shard_tar)}
    for row in rows:
        assert row["failure"] is None
        assert row["web_caption"] == web[row["key"]]
        assert isinstance(row["vlm_caption"], str)
        assert row["vlm_caption"] == row["vlm_caption"].strip()
        assert "<IMG_CONTEXT>" not in row["vlm_caption"]
        assert json.loads(row["settings"])["max_tiles"] == 2
    assert len({r["vlm_caption"] for r in rows}) > 1  # sampled from a random model

    caption.run(shard_tar, tmp_path / "b.parquet", settings, "000000")
    caption.run(shard_tar, tmp_path / "c.parquet", replace(settings, seed=1), "000000")
    first = [r["vlm_caption"] for r in rows]
    assert pq.read_table(tmp_path / "b.parquet").column("vlm_caption").to_pylist() == first
    assert pq.read_table(tmp_path / "c.parquet").column("vlm_caption").to_pylist() != first


def test_tile_budget_reaches_batch_chat(mini_chat: str, shard_tar: Path) -> None:
    tokenizer, model = caption.load_vlm(chat_settings(mini_chat))
    seen: list[tuple[int, list[int], list[str]]] = []
    real = model.batch_chat

    def spy(tok: Any, pixel_values: Any, **kwargs: Any) -> Any:
        seen.append((pixel_values.shape[0], kwargs["num_patches_list"], kwargs["questions"]))
        return real(tok, pixel_values, **kwargs)

    model.batch_chat = spy
    samples = list(iter_samples(shard_tar))[3:5]  # 61x30 (2.03:1) and 68x30 (2.27:1)
    # Unset, the budget is the model cards' 12: 68x30 is then closest to a 5x2 grid.
    for max_tiles, tiles in ((1, [1, 1]), (2, [3, 3]), (None, [3, 11])):
        settings = chat_settings(mini_chat, max_tiles=max_tiles)
        captions = caption.caption_batch(tokenizer, model, samples, settings)
        assert len(captions) == 2
        rows, counts, questions = seen[-1]
        assert counts == tiles and rows == sum(tiles)
        assert questions == ["<image>\n" + PROMPT] * 2


def test_greedy_batch_chat_equals_one_chat_per_image(mini_chat: str, shard_tar: Path) -> None:
    tokenizer, model = internvl_chat.load(chat_settings(mini_chat, max_tiles=4))
    # Without the miniature's delimiter bias, greedy decoding shows the model's own text.
    model.language_model.generation_config.sequence_bias = None
    images = [sample.image() for sample in iter_samples(shard_tar)]
    pixel_values, counts = pixel_batch(images, 448, 4, True)
    greedy = {"max_new_tokens": 8, "do_sample": False}
    batched = model.batch_chat(
        tokenizer,
        pixel_values,
        num_patches_list=counts,
        questions=["<image>\n" + PROMPT] * len(images),
        generation_config=dict(greedy),
    )
    one_by_one = []
    start = 0
    for count in counts:
        tiles = pixel_values[start : start + count]
        one_by_one.append(model.chat(tokenizer, tiles, PROMPT, dict(greedy)))
        start += count
    assert batched == one_by_one
    assert any(answer for answer in batched)


def test_v15_miniature_has_the_published_layout(tmp_path: Path) -> None:
    """InternVL-Chat-V1.5 in miniature: the published config.json fields and weight names
    (what vLLM's InternVLChatModel and InternLM2 load), InternLM2's tokenizer class as
    remote code, and stops at the end of the chat turn."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / "v15"
    internvl_minis.build_mini_internvl_chat_v15(folder, 0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config.vision_config).__name__ == "InternVisionConfig"
    assert type(config.llm_config).__name__ == "InternLM2Config"
    assert (config.template, config.ps_version, config.max_dynamic_patch) == (
        "internlm2-chat",
        "v2",
        12,
    )
    assert config.use_thumbnail and config.dynamic_image_size
    llm, vision = config.llm_config, config.vision_config
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        qkv = weights.get_slice("language_model.model.layers.0.attention.wqkv.weight")
        head_dim = llm.hidden_size // llm.num_attention_heads
        rows = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * head_dim
        assert qkv.get_shape() == [rows, llm.hidden_size]
    assert {
        "vision_model.embeddings.class_embedding",
        "vision_model.encoder.layers.0.attn.q_norm.weight",
        "vision_model.encoder.layers.0.ls1",
        "mlp1.1.weight",
        "language_model.output.weight",
        "language_model.model.tok_embeddings.weight",
    } <= names
    assert len(names) == 4 + 13 * vision.num_hidden_layers + 6 + 3 + 7 * llm.num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(tokenizer).__name__ == "InternLM2TokenizerFast"
    reference = str(folder)
    assert internvl_chat.turn_end_ids(reference, tokenizer) == [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    assert internvl_chat.vllm_engine_options(None) == {}
    assert internvl_chat.vllm_engine_options(40) == {
        "mm_processor_kwargs": {"max_dynamic_patch": 40}
    }
    # On the hf backend it is refused with transformers 5's error; on vllm it is routed.
    with pytest.raises(ValueError, match="InternLM2ForCausalLM' object has no attribute"):
        caption.vlm_route(reference, trust_remote_code=True)
    assert caption.vlm_route(reference, True, "vllm") == caption.INTERNVL_CHAT
