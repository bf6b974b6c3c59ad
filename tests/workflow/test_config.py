"""A config that breaks the schema or names an unknown model stops with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workflow.conftest import load_config, save_config, snakemake

pytestmark = pytest.mark.workflow


def dry_run_with(workdir: Path, change: dict[str, object]) -> str:
    config = load_config(workdir)
    for dotted, value in change.items():
        section = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section[part]
        section[leaf] = value
    original = (workdir / "config" / "config.yaml").read_text(encoding="utf-8")
    try:
        save_config(workdir, config)
        run = snakemake(workdir, "-n", "all")
    finally:
        (workdir / "config" / "config.yaml").write_text(original, encoding="utf-8")
    assert run.returncode != 0
    return run.stdout + run.stderr


def test_wrong_type_names_the_key(workdir: Path) -> None:
    output = dry_run_with(workdir, {"caption.max_new_tokens": "many"})
    assert "max_new_tokens" in output
    assert "'many' is not of type 'integer'" in output


def test_unknown_model_path_names_the_key(workdir: Path) -> None:
    output = dry_run_with(workdir, {"models.vlm": "./models/not-here"})
    assert "config.models.vlm: './models/not-here' is not an existing model folder" in output


def test_offline_hub_id_without_a_cached_copy_names_the_key(workdir: Path) -> None:
    output = dry_run_with(workdir, {"models.llm": "no-such-org/no-such-model"})
    assert "config.models.llm: 'no-such-org/no-such-model'" in output
    assert "HF_HUB_OFFLINE" in output


def test_undefined_train_dataset_names_the_key(workdir: Path) -> None:
    output = dry_run_with(workdir, {"train_datasets": ["nope"]})
    assert "config.train_datasets: dataset 'nope' is not defined" in output


def test_a_captioner_transformers_5_cannot_run_is_refused_with_its_error(workdir: Path) -> None:
    # InternVL-Chat-V1.5's config: an InternVL chat model whose language model is InternLM2.
    folder = workdir / "models" / "internvl-chat-v1-5"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternVLChatModel"],
                "model_type": "internvl_chat",
                "llm_config": {"architectures": ["InternLM2ForCausalLM"]},
            }
        )
    )
    output = dry_run_with(
        workdir, {"models.vlm": "models/internvl-chat-v1-5", "models.trust_remote_code": True}
    )
    assert "config.models.vlm: 'models/internvl-chat-v1-5'" in output
    assert "'InternLM2ForCausalLM' object has no attribute 'generate'" in output
    assert "InternVL3-8B-hf" in output
