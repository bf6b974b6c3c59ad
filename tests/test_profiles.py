"""The Slurm profiles users edit: keys the executor plugin reads, and the two in step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
TRAIN_RULES = ("train_phase1", "train_phase2")


def load(name: str) -> dict[str, Any]:
    with open(PROFILES / name / "config.yaml", encoding="utf-8") as handle:
        profile: dict[str, Any] = yaml.safe_load(handle)
    return profile


def test_multinode_profile_differs_from_the_slurm_profile_only_in_training() -> None:
    single, multi = load("slurm"), load("slurm-multinode")
    assert {k: v for k, v in single.items() if k != "set-resources"} == {
        k: v for k, v in multi.items() if k != "set-resources"
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
