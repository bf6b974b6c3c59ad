"""Figures for the Snakemake report."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes

import matplotlib.pyplot as plt

from vlmflow.io import atomic_path


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training(runs: dict[str, str | Path], out_png: str | Path) -> None:
    """Loss (left) and learning rate (right) per optimiser step, one line per phase."""
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, run_dir in runs.items():
        history = read_metrics(run_dir)
        steps = [entry["step"] for entry in history]
        loss_axis.plot(steps, [entry["loss"] for entry in history], label=label)
        lr_axis.plot(steps, [entry["lr"] for entry in history], label=label)
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    lr_axis.set(title="learning rate", xlabel="step", ylabel="lr")
    for axis in (loss_axis, lr_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
