"""The presets run end to end on their shape-faithful miniatures (vlmflow.demo.miniatures).

Each preset is used as a user would (``--configfile config/presets/NAME.yaml``), its hub
ids pinned to commits; the miniatures sit in a hub cache of the test's own at those
commits, so every stage loads them with ``from_pretrained(org/name, revision=...)`` and
``HF_HUB_OFFLINE=1`` as it would load the real weights. A preset that discards every
sample, overflows a context or misplaces image tokens fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.workflow.conftest import REPO, job_counts, make_workdir, run_readme, snakemake
from vlmflow.core.h5_layout import INPUT_IDS, KEY_PADDING_MASK, LOSS_MASK
from vlmflow.demo.miniatures import install

pytestmark = [pytest.mark.workflow, pytest.mark.presets]

TRAIN_SHARDS = ["000000", "000001"]
VLMFLOW = str(Path(sys.executable).parent / "vlmflow")


@dataclass(frozen=True)
class Expected:
    """What a preset's run must show."""

    config_files: tuple[str, ...]
    num_patches: int
    max_seq_len: int
    image_size: int


# rovi sets the captioner and the attribute LLM only; it is run as its comments say, with
# llava15 training on its output.
PRESETS = {
    "llava15": Expected(("llava15",), num_patches=576, max_seq_len=2048, image_size=336),
    "nxtp": Expected(("nxtp",), num_patches=256, max_seq_len=512, image_size=224),
    "rovi": Expected(("rovi", "llava15"), num_patches=576, max_seq_len=2048, image_size=336),
    "qwen2vl": Expected(("qwen2vl",), num_patches=16, max_seq_len=128, image_size=32),
    "rovi_v15": Expected(
        ("rovi_v15", "llava15"), num_patches=576, max_seq_len=2048, image_size=336
    ),
}
# Presets whose captioner runs on the vLLM backend: `make test-vllm` runs them.
ON_VLLM = {"rovi_v15"}


def preset_files(names: tuple[str, ...]) -> list[str]:
    return [f"config/presets/{name}.yaml" for name in names]


def merged_models(workdir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """config.yaml's models with the presets' on top, as Snakemake merges them."""
    models: dict[str, Any] = {}
    for path in ["config/config.yaml", *preset_files(names)]:
        models |= yaml.safe_load((workdir / path).read_text()).get("models", {})
    return models


@dataclass
class PresetRun:
    name: str
    workdir: Path
    env: dict[str, str]
    output: str
    returncode: int

    def snakemake(self, *args: str, extra: tuple[str, ...] = ()) -> Any:
        files = [*preset_files(PRESETS[self.name].config_files), *extra]
        return snakemake(self.workdir, *args, "--configfile", *files, env=self.env)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every preset's miniatures, installed by the README's command."""
    cache = tmp_path_factory.mktemp("hub")
    presets = sorted(str(path) for path in (REPO / "config" / "presets").glob("*.yaml"))
    done = subprocess.run(
        [VLMFLOW, "miniatures", "--configfile", *presets, "--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split()) >= len(presets)  # one folder per model it installed
    return cache


README_PRESETS = [
    "snakemake --profile profiles/slurm all --configfile config/presets/llava15.yaml",
    "snakemake --profile profiles/slurm all --configfile config/presets/rovi.yaml "
    "config/presets/llava15.yaml",
]


@pytest.mark.parametrize("command", README_PRESETS, ids=["llava15", "rovi+llava15"])
def test_the_readme_preset_commands_plan_on_the_slurm_profile(
    tmp_path: Path, hub_cache: Path, command: str
) -> None:
    """The README's preset commands as written, dry-run (-n; no cluster needed): every
    GPU stage asks for a GPU."""
    workdir = make_workdir(tmp_path)
    run = run_readme(workdir, command, "-n", env={"HF_HUB_CACHE": str(hub_cache)})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    counts = job_counts(run.stdout)
    assert counts["caption"] == 3 and counts["train_phase2"] == 1


def test_the_readme_download_loop_asks_for_every_pinned_model(tmp_path: Path) -> None:
    """The README's `grep ... | while ...; do hf download ...` with a stand-in `hf`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    loop = readme.split("grep -ho", 1)[1].split("```", 1)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "downloads.txt"
    (bin_dir / "hf").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "hf").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", "grep -ho" + loop], cwd=REPO, env=env, check=True)
    asked = sorted(log.read_text().splitlines())
    pinned = set()
    for preset in (REPO / "config" / "presets").glob("*.yaml"):
        models = yaml.safe_load(preset.read_text()).get("models", {})
        pinned |= {ref for ref in models.values() if isinstance(ref, str) and "@" in ref}
    expected = sorted(
        f"download {ref.split('@')[0]} --revision {ref.split('@')[1]}" for ref in pinned
    )
    assert asked == expected


@pytest.fixture(scope="module")
def preset_run(
    tmp_path_factory: pytest.TempPathFactory, hub_cache: Path
) -> Callable[[str], PresetRun]:
    """Each preset's full run, once per module, in a workdir of its own."""
    runs: dict[str, PresetRun] = {}

    def run(name: str) -> PresetRun:
        if name not in runs:
            workdir = make_workdir(tmp_path_factory.mktemp(name))
            if name in ON_VLLM:  # the engine's environment where `make setup-vllm` puts it
                (workdir / ".venv-vllm").symlink_to(REPO / ".venv-vllm")
            env = {"HF_HUB_CACHE": str(hub_cache)}
            files = preset_files(PRESETS[name].config_files)
            done = snakemake(workdir, "all", "--configfile", *files, env=env)
            runs[name] = PresetRun(name, workdir, env, done.stdout + done.stderr, done.returncode)
        return runs[name]

    return run


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.vllm] * (name in ON_VLLM)) for name in sorted(PRESETS)],
)
def test_preset_runs_end_to_end_on_its_miniatures(
    name: str, preset_run: Callable[[str], PresetRun]
) -> None:
    run = preset_run(name)
    assert run.returncode == 0, run.output[-6000:]
    expected = PRESETS[name]
    results = run.workdir / "results"
    models = merged_models(run.workdir, expected.config_files)

    # Every stage ran on the pinned models, and every key came out of it.
    for shard in TRAIN_SHARDS:
        captions = pq.read_table(results / "photos" / "captions" / f"{shard}.parquet")
        rows = captions.to_pylist()
        assert len(rows) == 8
        assert all(row["failure"] is None and row["vlm_caption"] for row in rows)
        if "@" in models["vlm"]:
            assert {row["model"] for row in rows} == {models["vlm"]}
        if name in ON_VLLM:
            assert all(row["engine"].startswith("vllm ") for row in rows), rows[0]["engine"]
        phase1 = pq.read_table(results / "photos" / "attributes" / "phase1" / f"{shard}.parquet")
        if "@" in models["llm"]:
            assert set(phase1.column("model").to_pylist()) == {models["llm"]}

    # The H5 files hold samples, laid out for the preset's vision tower and context.
    data_params = json.loads((results / "photos" / "h5" / "data_params.json").read_text())
    assert data_params["num_patches"] == expected.num_patches
    assert data_params["settings"]["max_seq_len"] == expected.max_seq_len
    own_budget = any(
        "max_seq_len" in (yaml.safe_load((run.workdir / path).read_text()).get("h5") or {})
        for path in preset_files(expected.config_files)
    )
    for phase in ("phase1", "phase2"):
        totals = data_params["totals"][phase]
        assert totals["n_examples"] > 0, totals
        if own_budget:
            assert totals["discarded_too_long"] == 0, totals
        else:
            # The demo's 128 tokens and the demo LLM's noise labels, whose length varies:
            # most samples fit (a budget that overflows would discard most or all).
            assert totals["discarded_too_long"] < totals["n_examples"] / 4, totals
    check_image_slots(results / "photos" / "h5", data_params)

    # The trained model reads images at the tower's size and answers the eval.
    trained = json.loads((results / "train" / "phase2" / "config.json").read_text())
    assert trained["vision_config"]["image_size"] == expected.image_size
    metrics = (results / "eval" / "metrics.tsv").read_text().splitlines()
    assert len(metrics) > 1

    again = run.snakemake("-n", "all")
    assert again.returncode == 0 and job_counts(again.stdout) == {}, again.stdout[-3000:]


def check_image_slots(h5_root: Path, data_params: dict[str, Any]) -> None:
    """Every row has its num_patches pad slots at the patch start, text on both sides, and
    no loss on them (but the last, which predicts the first text token in phase 1)."""
    patches, pad = data_params["num_patches"], data_params["pad_id"]
    for phase in ("phase1", "phase2"):
        start = data_params["image_patch_start_idx"][phase]
        for shard in TRAIN_SHARDS:
            with h5py.File(h5_root / phase / f"{shard}.h5", "r") as f:
                data = f["data"][:]
            slots = data[:, INPUT_IDS, start : start + patches]
            assert (slots == pad).all()
            assert (data[:, INPUT_IDS, start - 1] != pad).all()
            assert (data[:, INPUT_IDS, start + patches] != pad).all()
            assert (data[:, LOSS_MASK, start : start + patches - 1] == 0).all()
            assert (data[:, KEY_PADDING_MASK, : start + patches + 1] == 0).all()
            answer = data[:, LOSS_MASK].sum(axis=1)
            assert (answer > 0).all() and np.all(answer < data.shape[2] - patches)


def test_the_readme_recipe_with_max_seq_len_128_is_refused_at_dag_build(
    tmp_path: Path, hub_cache: Path
) -> None:
    workdir = make_workdir(tmp_path)
    (workdir / "msl.yaml").write_text("h5:\n  max_seq_len: 128\n")
    run = snakemake(
        workdir,
        "-n",
        "all",
        "--configfile",
        "config/presets/llava15.yaml",
        "msl.yaml",
        env={"HF_HUB_CACHE": str(hub_cache)},
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "config.h5.max_seq_len: 128 leaves no room for an answer" in output
    assert "576 image patches" in output
    minimum = int(output.split("The minimum is ")[1].split()[0])
    assert 576 < minimum < 1024
    assert f"use at least {minimum}" in output
    assert "Building DAG of jobs" not in output  # refused before any job was planned


def test_a_new_revision_of_one_model_reruns_exactly_the_stages_that_load_it(
    preset_run: Callable[[str], PresetRun], hub_cache: Path
) -> None:
    run = preset_run("llava15")
    assert run.returncode == 0, run.output[-3000:]
    models = merged_models(run.workdir, ("llava15",))
    name = models["language_model"].split("@")[0]
    install(f"{name}@{'1' * 40}", hub_cache)
    (run.workdir / "pin.yaml").write_text(
        yaml.safe_dump({"models": {"language_model": f"{name}@{'1' * 40}"}})
    )
    dry = run.snakemake("-n", "all", extra=("pin.yaml",))
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout)
    # The LM's tokenizer packs the H5 files and its weights start training: those rerun
    # (and what reads their outputs); ingest, captions and attributes do not.
    assert counts["h5"] == len(TRAIN_SHARDS)
    assert counts["train_phase1"] == 1
    for rule in ("ingest", "caption", "attributes_phase1", "attributes_phase2", "demo_model"):
        assert rule not in counts, counts
    # The H5 jobs run because of the new pin itself (training also because their files do).
    changed = [line for line in dry.stdout.splitlines() if "Params have changed" in line]
    assert len(changed) >= len(TRAIN_SHARDS)
    assert all(f"now: '{name}@{'1' * 40}'" in line for line in changed)
