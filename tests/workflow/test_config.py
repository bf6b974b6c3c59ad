"""A config that breaks the schema or names an unknown model stops with the key named."""

from __future__ import annotations

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
