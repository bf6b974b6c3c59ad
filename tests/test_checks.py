"""Config checks that look at the models (vlmflow.checks), pinned revisions and the
miniatures' hub-cache layout (vlmflow.demo.miniatures)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmflow import checks
from vlmflow.core import engine
from vlmflow.core.errors import ConfigError
from vlmflow.core.models import (
    cached_file,
    in_hub_cache,
    is_hub_id,
    llava_hub_name,
    pretrained,
    resolved_revision,
    split_revision,
)
from vlmflow.demo import miniatures
from vlmflow.families.internvl_chat import INTERNLM2_ERROR
from vlmflow.stages import attributes, caption, h5
from vlmflow.stages.ingest.settings import check_section

REPO = Path(__file__).resolve().parent.parent
PIN = "ab" * 20
LLAMA3 = f"meta-llama/Meta-Llama-3-8B-Instruct@{PIN}"
CLIP336 = f"openai/clip-vit-large-patch14-336@{PIN}"
VICUNA = f"lmsys/vicuna-7b-v1.5@{PIN}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding three miniatures at PIN; HF_HUB_CACHE points at it."""
    cache = tmp_path_factory.mktemp("hub")
    for reference in (LLAMA3, CLIP336, VICUNA):
        miniatures.install(reference, cache)
    return cache


@pytest.fixture
def offline_hub(hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def base_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["attributes"]["max_seq_len"] = None
    config["h5"].setdefault("phase2_style", "vicuna_v1")
    config["h5"].setdefault("vision_features", False)
    for key in ("caption", "attributes"):
        section = config[key]
        for sub in (section, *(section.get(p, {}) for p in ("phase1", "phase2"))):
            if "prompt" in sub:
                sub["prompt"] = str(REPO / sub["prompt"])
    return config


def test_a_pinned_reference_splits_into_name_and_revision(tmp_path: Path) -> None:
    assert split_revision(f"org/name@{PIN}") == ("org/name", PIN)
    assert split_revision("org/name") == ("org/name", None)
    assert pretrained(f"org/name@{PIN}", dtype="x") == {
        "pretrained_model_name_or_path": "org/name",
        "revision": PIN,
        "dtype": "x",
    }
    assert pretrained("org/name") == {"pretrained_model_name_or_path": "org/name"}
    assert is_hub_id(f"org/name@{PIN}")
    folder = tmp_path / "model@v2"  # a folder whose name holds an @ stays a folder
    folder.mkdir()
    assert split_revision(str(folder)) == (str(folder), None)
    assert not is_hub_id(str(folder))


def test_miniatures_sit_in_the_hub_cache_at_the_pinned_commit(offline_hub: Path) -> None:
    folder = miniatures.snapshot_dir(offline_hub, "lmsys/vicuna-7b-v1.5", PIN)
    assert (folder / "config.json").is_file()
    refs = folder.parent.parent / "refs" / "main"
    assert refs.read_text() == PIN
    assert in_hub_cache(VICUNA)
    assert not in_hub_cache(f"lmsys/vicuna-7b-v1.5@{'cd' * 20}")
    assert cached_file(VICUNA, "config.json") == folder / "config.json"
    # An unpinned reference resolves to the commit main points at here.
    assert resolved_revision("lmsys/vicuna-7b-v1.5") == PIN
    assert resolved_revision(VICUNA) == PIN
    assert resolved_revision("nobody/nothing") is None


def test_miniatures_keep_the_real_checkpoints_conventions(offline_hub: Path) -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    llama3 = AutoTokenizer.from_pretrained(**pretrained(LLAMA3))
    assert llama3.pad_token is None  # Llama 3 ships without one
    text = llama3.apply_chat_template(
        [{"role": "user", "content": " hi "}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    generation = json.loads(cached_file(LLAMA3, "generation_config.json").read_text())  # type: ignore[union-attr]
    eot, end = llama3.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert set(generation["eos_token_id"]) == {eot, end}
    assert AutoConfig.from_pretrained(**pretrained(LLAMA3)).max_position_embeddings == 8192
    vicuna = AutoTokenizer.from_pretrained(**pretrained(VICUNA))
    assert (vicuna.bos_token, vicuna.eos_token, vicuna.pad_token) == ("<s>", "</s>", None)
    assert not vicuna.chat_template
    clip = AutoConfig.from_pretrained(**pretrained(CLIP336)).vision_config
    assert (clip.image_size, clip.patch_size) == (336, 14)
    processor = AutoImageProcessor.from_pretrained(**pretrained(CLIP336))
    assert processor.crop_size["height"] == 336


def test_a_miniature_needs_a_known_model_pinned_to_a_commit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no miniature of 'someone/else'"):
        miniatures.install(f"someone/else@{PIN}", tmp_path)
    with pytest.raises(ValueError, match="pinned to a commit"):
        miniatures.install("lmsys/vicuna-7b-v1.5", tmp_path)


def test_every_preset_names_pinned_models_that_have_miniatures() -> None:
    for path in sorted((REPO / "config" / "presets").glob("*.yaml")):
        models = yaml.safe_load(path.read_text())["models"]
        for reference in miniatures.hub_references(models):
            name, revision = split_revision(reference)
            assert revision is not None and len(revision) == 40, (path.name, reference)
            assert name in miniatures.MINIATURES, (path.name, reference)


def test_an_uncached_pinned_model_is_refused_with_the_download_command(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    missing = f"lmsys/vicuna-7b-v1.5@{'cd' * 20}"
    with pytest.raises(ConfigError) as error:
        checks.check_model_reference("language_model", missing, ("vlm",))
    assert str(error.value).startswith(f"config.models.language_model: {missing!r}")
    assert f"hf download lmsys/vicuna-7b-v1.5 --revision {'cd' * 20}" in str(error.value)
    checks.check_model_reference("language_model", VICUNA, ("vlm",))


def test_max_seq_len_without_room_for_patches_template_and_answer_is_refused(
    offline_hub: Path,
) -> None:
    config = base_config()
    config["h5"]["max_seq_len"] = 128
    vision, lm = checks.model_files(CLIP336), checks.model_files(VICUNA)
    assert vision is not None and lm is not None
    config["models"] |= {"vision_tower": CLIP336, "language_model": VICUNA}
    with pytest.raises(ConfigError) as error:
        h5.check_budget(config, vision, lm)
    message = str(error.value)
    assert message.startswith("config.h5.max_seq_len: 128 leaves no room for an answer")
    assert "576 image patches" in message
    minimum = int(message.split("The minimum is ")[1].split()[0])
    config["h5"]["max_seq_len"] = minimum
    h5.check_budget(config, vision, lm)
    config["h5"]["max_seq_len"] = minimum - 1
    with pytest.raises(ConfigError):
        h5.check_budget(config, vision, lm)
    # Vicuna's context is 4,096 tokens: a longer max_seq_len overflows it.
    config["h5"]["max_seq_len"] = 8192
    with pytest.raises(ConfigError, match=r"longer than the context .* \(4096 tokens"):
        h5.check_budget(config, vision, lm)


def test_an_llm_context_shorter_than_a_prompt_template_is_refused(offline_hub: Path) -> None:
    config = base_config()
    config["models"]["llm"] = LLAMA3
    folder = checks.model_files(LLAMA3)
    assert folder is not None
    attributes.check_context(config, folder)  # 8,192 tokens hold both phases
    config["attributes"]["max_seq_len"] = 256
    with pytest.raises(ConfigError) as error:
        attributes.check_context(config, folder)
    message = str(error.value)
    assert message.startswith("config.attributes.max_seq_len: 256 tokens cannot hold")
    need = int(message.split(" in all")[0].split()[-1])
    assert need > 256 and f"at least {need}" in message
    config["attributes"]["max_seq_len"] = 100_000
    with pytest.raises(ConfigError, match=r"longer than the context .* \(8192 tokens\)"):
        attributes.check_context(config, folder)


def test_models_an_earlier_job_builds_are_left_to_the_jobs(offline_hub: Path) -> None:
    config = copy.deepcopy(base_config())
    config["h5"]["max_seq_len"] = 8
    config["models"] |= {"vision_tower": CLIP336, "language_model": VICUNA, "llm": LLAMA3}
    with pytest.raises(ConfigError):
        checks.check_models(config, checked_by_jobs=lambda reference: False)
    checks.check_models(config, checked_by_jobs=lambda reference: True)


def write_config(folder: Path, config: dict[str, Any]) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_captioner_no_route_can_run_is_refused_with_the_alternatives(tmp_path: Path) -> None:
    chat = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "llm_config": {"architectures": ["InternLM2ForCausalLM"]},
    }
    v15 = write_config(tmp_path / "v15", chat)
    with pytest.raises(ConfigError) as error:
        caption.check_model("OpenGVLab/InternVL-Chat-V1-5", v15, trust_remote_code=True)
    message = str(error.value)
    assert message.startswith("config.models.vlm: 'OpenGVLab/InternVL-Chat-V1-5'")
    assert INTERNLM2_ERROR in message and "InternVL3-8B-hf" in message
    assert "caption.backend: vllm" in message
    # vLLM runs the family with its own implementation: routed there, not refused.
    caption.check_model("OpenGVLab/InternVL-Chat-V1-5", v15, trust_remote_code=True, backend="vllm")
    for backend in ("hf", "vllm"):
        with pytest.raises(ConfigError, match="trust_remote_code: true"):
            caption.check_model("chat", v15, trust_remote_code=False, backend=backend)
    bert = write_config(tmp_path / "bert", {"architectures": ["BertModel"], "model_type": "bert"})
    with pytest.raises(ConfigError, match=r"BertModel, which the caption stage cannot load"):
        caption.check_model("bert", bert, trust_remote_code=False)
    llava = write_config(
        tmp_path / "llava",
        {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"},
    )
    caption.check_model("llava", llava, trust_remote_code=False)
    caption.check_model("not here", None, trust_remote_code=False)


def test_vlmflow_miniatures_writes_a_presets_models_into_a_cache_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmflow import cli

    preset = str(REPO / "config" / "presets" / "llava15.yaml")
    assert cli.main(["miniatures", "--configfile", preset, "--cache", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    models = yaml.safe_load(Path(preset).read_text())["models"]
    expected = [
        str(miniatures.snapshot_dir(tmp_path, *split_revision(models[key])))  # type: ignore[arg-type]
        for key in ("vision_tower", "language_model")
    ]
    assert printed == expected
    # Stand-ins at the real commits must never land in the real hub cache.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        cli.main(["miniatures", "--configfile", preset, "--cache", str(tmp_path)])
    assert "is the real hub cache" in capsys.readouterr().err


def test_the_llava_miniature_keeps_the_hub_weight_names_and_loads_every_weight(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = tmp_path / "llava"
    miniatures.build_llava15_hf(folder, seed=0)
    saved = load_file(str(folder / "model.safetensors"))
    assert any(name.startswith("vision_tower.vision_model.") for name in saved)
    assert any(name.startswith("language_model.model.layers.") for name in saved)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    loaded = model.state_dict()
    assert len(loaded) == len(saved)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, saved[llava_hub_name(name)]), name
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe. ASSISTANT:"


def test_the_vllm_backend_with_a_meta_checkpoint_is_refused(
    demo_models: dict[str, str],
) -> None:
    config = base_config()
    config["models"]["llm"] = demo_models["metallama"]
    for phase in ("phase1", "phase2"):
        config["attributes"][phase]["backend"] = "hf"
    attributes.check_backend(config, demo_models["metallama"])
    config["attributes"]["phase2"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match=r"attributes.phase2.backend: vllm cannot load"):
        attributes.check_backend(config, demo_models["metallama"])


@pytest.mark.parametrize(
    "command",
    [
        ".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server",
        ".vllm-conda/bin/vllm serve",
        "apptainer exec --nv vllm.sif vllm serve",
    ],
)
def test_a_vllm_command_that_starts_a_server_is_refused_with_what_to_give(command: str) -> None:
    with pytest.raises(ConfigError, match=r"config.vllm.command: .* the Python of the engine"):
        engine.check_command({"vllm": {"command": command}})
    for python in (".venv-vllm/bin/python", "apptainer exec --nv vllm.sif python3"):
        engine.check_command({"vllm": {"command": python}})
    engine.check_command({})


def test_the_ingest_section_is_checked_at_dag_build_and_earlier_names_warn() -> None:
    assert check_section({"resize_mode": "keep_ratio", "image_size": 512}) == []
    [note] = check_section({"resize_mode": "keep_ratio", "max_side": 256})
    assert "resize_mode: keep_ratio_largest, image_size: 256, resize_only_if_bigger: true" in note
    assert check_section({"resize_mode": False}) == []  # YAML's reading of a bare `no`
    with pytest.raises(ConfigError, match=r"config\.ingest\.resize_mode: 'stretch'"):
        check_section({"resize_mode": "stretch"})


def repo_config() -> dict[str, Any]:
    """config/config.yaml with the schema's defaults, as the workflow validates it."""
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def test_check_config_names_the_key_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    demo_kinds = ("vlm", "llm", "vision", "lm")
    assert checks.check_config(repo_config(), demo_kinds) == []
    broken: list[tuple[dict[str, Any], str]] = []
    config = repo_config()
    config["eval_datasets"] = ["nowhere"]
    broken.append((config, "config.eval_datasets: dataset 'nowhere' is not defined"))
    config = repo_config()
    next(iter(config["datasets"].values()))["url_list"] = "data/missing.tsv"
    broken.append((config, "url_list: 'data/missing.tsv' does not exist"))
    config = repo_config()
    config["attributes"]["phase2"]["prompt"] = "config/prompts/gone.txt"
    broken.append((config, "config.attributes.phase2.prompt: file 'config/prompts/gone.txt'"))
    config = repo_config()
    config["ingest"]["resize_mode"] = "stretch"
    broken.append((config, "config.ingest.resize_mode: 'stretch'"))
    for config, message in broken:
        with pytest.raises(ConfigError, match=re.escape(message)):
            checks.check_config(config, demo_kinds)
