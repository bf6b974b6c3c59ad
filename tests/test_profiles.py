"""The Slurm profiles users edit: keys the executor plugin reads, and the two in step."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
TRAIN_RULES = ("train_phase1", "train_phase2")
# The job-array settings and the scheduler caps that have to change with them.
ARRAY_SETTINGS = ("slurm-array-jobs", "slurm-array-limit", "jobs", "max-jobs-per-timespan")


def load(name: str) -> dict[str, Any]:
    with open(PROFILES / name / "config.yaml", encoding="utf-8") as handle:
        profile: dict[str, Any] = yaml.safe_load(handle)
    return profile


def test_multinode_profile_differs_from_the_slurm_profile_only_in_training() -> None:
    single, multi = load("slurm"), load("slurm-multinode")
    # A multinode profile without job arrays keeps its own (array-free) scheduler caps.
    skip = {"set-resources", *(() if "slurm-array-jobs" in multi else ARRAY_SETTINGS)}
    assert {k: v for k, v in single.items() if k not in skip} == {
        k: v for k, v in multi.items() if k not in skip
    }
    rest = {k: v for k, v in single["set-resources"].items() if k not in TRAIN_RULES}
    assert rest == {k: v for k, v in multi["set-resources"].items() if k not in TRAIN_RULES}


def test_multinode_training_asks_for_gpus_per_node_and_one_task_per_gpu() -> None:
    for rule in TRAIN_RULES:
        train = load("slurm-multinode")["set-resources"][rule]
        assert train["nodes"] > 1 and train["mpi"] == "srun"
        assert f"--gpus-per-node={train['tasks_per_node']}" in train["slurm_extra"]
        assert "gpu" not in train  # would be GPUs per job, on top of the per-node ones


def test_gpu_rules_ask_with_keys_the_plugin_reads() -> None:
    resources = load("slurm")["set-resources"]
    for rule in ("caption", "attributes_phase1", "attributes_phase2", "evaluate"):
        assert resources[rule]["gpu"] == 1 and resources[rule]["slurm_partition"] == "gpu"
    for rule in TRAIN_RULES:
        train = resources[rule]
        # One process per GPU: the plugin turns tasks_per_gpu into --ntasks-per-gpu.
        assert train["gpu"] == train["tasks"] and train["tasks_per_gpu"] == 1, train
        assert train["mpi"] == "srun"
    for profile in ("slurm", "slurm-multinode"):
        for rule, values in load(profile)["set-resources"].items():
            assert "gpus" not in values, f"{profile}: {rule} uses 'gpus', which the plugin ignores"
            assert "attempt" in str(values.get("mem_mb", "attempt")), (profile, rule)


def _rule_blocks() -> dict[str, str]:
    """Each rule of the workflow's rule files: its text."""
    text = "\n".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))
    parts = re.split(r"^rule (\w+):$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_job_arrays_cover_per_shard_rules_and_nothing_holds_their_jobs_back() -> None:
    """Job arrays (snakemake-executor-plugin-slurm 2.8.0) only for per-shard rules, and
    without the settings under which the plugin hangs or cannot submit an array."""
    rules = _rule_blocks()
    for name in ("slurm", "slurm-multinode"):
        profile = load(name)
        if "slurm-array-jobs" not in profile:
            assert profile["jobs"] != "unlimited", name  # no arrays: keep a cap on jobs
            continue
        arrays = profile["slurm-array-jobs"].split(",")
        assert set(arrays) >= {"caption", "attributes_phase1", "attributes_phase2", "h5"}
        for rule in arrays:
            # One job per shard: an output named by the shard (train and evaluate are
            # single jobs, and an array of one is submitted as a plain job anyway).
            assert rule in rules and "{shard}" in rules[rule], (name, rule)
        # Grouped jobs are never submitted as arrays: a rule is one or the other.
        assert not set(arrays) & set(profile.get("groups", {})), name
        # Every ready job of a rule must reach the plugin in one round, or it drops them
        # and the run hangs (plugin issue #473): no cap on jobs or on jobs per second...
        assert profile["jobs"] == "unlimited", name
        count = int(str(profile["max-jobs-per-timespan"]).split("/")[0])
        assert count >= 100_000, name
        # ... and no global resource cap on what the array rules ask for (a local one
        # only bounds a group job).
        scopes = profile.get("set-resource-scopes", {})
        capped = {key for key in profile.get("resources", {}) if scopes.get(key) != "local"}
        for rule in arrays:
            asked = {*profile.get("default-resources", {}), *profile["set-resources"].get(rule, {})}
            assert not capped & asked, (name, rule, capped & asked)
        # Each task's command (about 3 KB) rides in the one sbatch command line, under
        # Linux's 128 KiB per argument; tests/slurm measures the size on a real array.
        assert 2 <= profile["slurm-array-limit"] <= 30, name
