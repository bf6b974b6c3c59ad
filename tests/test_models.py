"""Tests for the demo models: they must load exactly like the real hub models do."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import demo_model_settings
from vlmflow.core.models import IMAGE, is_hub_id, torch_dtype
from vlmflow.demo.demo_models import BOS, DEMO_BUILDERS, EOS, EOT, build_demo_llm


def _weights(folder: str | Path) -> dict[str, torch.Tensor]:
    if (Path(folder) / "consolidated.00.pth").exists():  # Meta's format
        return dict(torch.load(Path(folder) / "consolidated.00.pth", weights_only=True))
    return load_file(str(Path(folder) / "model.safetensors"))


# ---------------------------------------------------------------------------
# Loading through the Auto* classes, as the stages load InternVL, Llama-3, CLIP
# ---------------------------------------------------------------------------


def test_vlm_loads_with_auto_classes_and_generates(demo_models: dict[str, str]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_models["vlm"])
    model = AutoModelForImageTextToText.from_pretrained(demo_models["vlm"]).eval()
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert IMAGE in text
    inputs = processor(
        images=[Image.new("RGB", (40, 30), (200, 30, 30))], text=[text], return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    # The single <image> of the template expands to one token per patch: (32 / 8) ** 2.
    assert int((inputs["input_ids"] == image_id).sum()) == 16
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("kind", ["llm", "lm"])
def test_language_models_load_with_auto_classes(demo_models: dict[str, str], kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models[kind])
    model = AutoModelForCausalLM.from_pretrained(demo_models[kind]).eval()
    assert tokenizer.bos_token == BOS
    assert tokenizer.eos_token == EOS
    assert tokenizer.pad_token_id is not None
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("a red car", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert tuple(logits.shape) == (1, ids.shape[1], len(tokenizer))


def test_vision_tower_loads_with_auto_classes(demo_models: dict[str, str]) -> None:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(demo_models["vision"]).eval()
    image_processor = AutoImageProcessor.from_pretrained(demo_models["vision"])
    pixels = image_processor(images=Image.new("RGB", (50, 30), (1, 2, 3)), return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.inference_mode():
        hidden = model(pixel_values=pixels["pixel_values"]).last_hidden_state
    # 16 patches plus CLIP's class token.
    assert tuple(hidden.shape) == (1, 17, 32)


@pytest.mark.parametrize("kind", ["llm", "lm", "vlm"])
def test_generation_config_stops_on_eos_and_end_of_turn(
    demo_models: dict[str, str], kind: str
) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(demo_models[kind])
    config = GenerationConfig.from_pretrained(demo_models[kind])
    eos_ids = config.eos_token_id
    assert isinstance(eos_ids, list)
    assert set(eos_ids) == {
        tokenizer.convert_tokens_to_ids(EOS),
        tokenizer.convert_tokens_to_ids(EOT),
    }
    assert config.pad_token_id == tokenizer.pad_token_id


def test_chat_template_renders_user_turn_and_assistant_header(
    demo_models: dict[str, str],
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models["llm"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "list the objects"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "list the objects<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "list the objects"}],
        add_generation_prompt=False,
        tokenize=False,
    )
    assert without_prompt.endswith("list the objects<|eot_id|>")
    # Special tokens stay single tokens, so the stop id really is emitted as one id.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids(EOT)) == 1


def test_delimiter_bias_is_recorded_in_generation_config(demo_models: dict[str, str]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(demo_models["llm"])
    bias = GenerationConfig.from_pretrained(demo_models["llm"]).sequence_bias
    biased = {tokenizer.convert_ids_to_tokens(ids[0]) for ids, _ in bias}
    assert biased == {",", "\u010a"}


# ---------------------------------------------------------------------------
# Reproducibility of the builders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DEMO_BUILDERS))
def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, kind: str) -> None:
    build = functools.partial(DEMO_BUILDERS[kind], **demo_model_settings(kind))
    build(tmp_path / "a", 7)
    build(tmp_path / "b", 7)
    build(tmp_path / "c", 8)
    first, again, other = (_weights(tmp_path / name) for name in "abc")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    # Every random weight matrix changes with the seed. Biases, norms and some
    # embeddings (InternVL's class token and position embeddings) start constant.
    matrices = [
        name for name in first if first[name].ndim >= 2 and first[name].unique().numel() > 1
    ]
    assert matrices
    assert all(not torch.equal(first[name], other[name]) for name in matrices)


def test_tokenizer_does_not_depend_on_seed(tmp_path: Path) -> None:
    build_demo_llm(tmp_path / "a", 0, delimiter_bias=1.5)
    build_demo_llm(tmp_path / "b", 1, delimiter_bias=1.5)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_rebuilding_replaces_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "llm"
    build_demo_llm(folder, 0, delimiter_bias=1.5)
    (folder / "stale.txt").write_text("left over")
    build_demo_llm(folder, 1, delimiter_bias=1.5)
    assert not (folder / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "llm"]  # no temporary folders


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def test_torch_dtype() -> None:
    assert torch_dtype("auto", torch.device("cpu")) is torch.float32
    assert torch_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert torch_dtype("float16", torch.device("cpu")) is torch.float16
    assert torch_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert torch_dtype("float32", torch.device("cuda")) is torch.float32
    with pytest.raises(ValueError, match="'fp8'"):
        torch_dtype("fp8", torch.device("cpu"))


def test_is_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("meta-llama/Meta-Llama-3-8B-Instruct")
    assert is_hub_id("OpenGVLab/InternVL2_5-8B")
    assert is_hub_id("sentence-transformers/all-MiniLM-L6-v2")
    assert not is_hub_id("gpt2-no-org")
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("/abs/path")
    assert not is_hub_id("./models/x")
    # An existing local folder named like a hub id is a local folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "models").mkdir(parents=True)
    assert not is_hub_id("results/models")
    assert is_hub_id("results/other")
