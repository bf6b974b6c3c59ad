"""Figures for the Snakemake report (PNG, written atomically)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vlmflow.core.io import atomic_path

TRAINING_FIELDS = ("step", "loss", "lr")


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The per-step log of a training run: one JSON object per line, with step, loss, lr."""
    path = Path(run_dir) / "metrics.jsonl"
    history = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                history.append({name: float(entry[name]) for name in TRAINING_FIELDS})
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}, line {number}: expected a JSON object with numbers "
                    f"{', '.join(TRAINING_FIELDS)} ({exc!r})"
                ) from None
    return history


def plot_training(runs: dict[str, str | Path], out_png: str | Path) -> None:
    """One row per phase: loss (left) and learning rate (right) per optimiser step.

    Each phase gets its own axes: their learning rates differ by orders of magnitude
    (e.g. 1e-3 for the projector, 2e-5 for the language model), and phase 2's steps
    start again at 1.
    """
    figure, axes = plt.subplots(len(runs), 2, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for (label, run_dir), (loss_axis, lr_axis) in zip(runs.items(), axes, strict=True):
        history = read_metrics(run_dir)
        steps = [entry["step"] for entry in history]
        marker = "." if len(steps) <= 50 else None  # a short demo run: show each step
        loss_axis.plot(steps, [e["loss"] for e in history], color="tab:blue", marker=marker)
        lr_axis.plot(steps, [e["lr"] for e in history], color="tab:orange", marker=marker)
        final = f", last {history[-1]['loss']:.3f}" if history else ", no steps logged"
        loss_axis.set(title=f"{label}: training loss{final}", xlabel="step", ylabel="loss")
        lr_axis.set(title=f"{label}: learning rate", xlabel="step", ylabel="lr")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        for axis in (loss_axis, lr_axis):
            axis.grid(alpha=0.3)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, out_png)


def _save(figure: Figure, out_png: str | Path) -> None:
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def plot_funnel(
    counts: dict[str, int | None],
    failures: Sequence[tuple[str, str, int]],
    out_png: str | Path,
    title: str,
) -> None:
    """Samples left after each stage (left) and failures by stage and reason (right).

    ``counts`` maps stage labels to samples in pipeline order (None: not run, left out);
    ``failures`` are (stage, reason, samples), a stage ending in "(sample kept)" in grey.
    """
    stages = [(label, count) for label, count in counts.items() if count is not None]
    height = max(3.0, 0.35 * max(len(stages), len(failures)) + 1.5)
    figure, (funnel_axis, failure_axis) = plt.subplots(1, 2, figsize=(12, height))
    labels = [label for label, _ in stages][::-1]
    values = [count for _, count in stages][::-1]
    bars = funnel_axis.barh(labels, values, color="tab:blue")
    funnel_axis.bar_label(bars, padding=3)
    funnel_axis.set(title=f"{title}: samples left after each stage", xlabel="samples")
    funnel_axis.set_xlim(0, max([*values, 1]) * 1.15)
    if failures:
        names = [f"{stage}: {reason}" for stage, reason, _ in failures][::-1]
        numbers = [count for *_, count in failures][::-1]
        colours = [
            "tab:gray" if stage.endswith("(sample kept)") else "tab:red" for stage, _, _ in failures
        ][::-1]
        bars = failure_axis.barh(names, numbers, color=colours)
        failure_axis.bar_label(bars, padding=3)
        failure_axis.set_xlim(0, max(numbers) * 1.2)
    else:
        failure_axis.text(0.5, 0.5, "no failures", ha="center", va="center")
        failure_axis.set_yticks([])
    failure_axis.set(title="failures by stage and reason", xlabel="samples")
    _save(figure, out_png)


def _integer_bins(values: Sequence[int]) -> list[float]:
    top = max(values, default=0)
    step = max(1, (top + 1) // 40)  # at most ~40 bars
    return [edge - 0.5 for edge in range(0, top + step + 1, step)]


def plot_caption_lengths(
    vlm: Sequence[int], web: Sequence[int], out_png: str | Path, title: str, notes: str
) -> None:
    """Histograms of words per caption: the VLM's captions and the source's web captions."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for axis, lengths, name in ((axes[0], vlm, "VLM captions"), (axes[1], web, "web captions")):
        if lengths:
            axis.hist(lengths, bins=_integer_bins(lengths), color="tab:blue")
            mean = sum(lengths) / len(lengths)
            axis.set_title(f"{name}: {len(lengths)} captions, mean {mean:.1f} words")
        else:
            axis.text(0.5, 0.5, "no captions", ha="center", va="center")
            axis.set_title(name)
        axis.set(xlabel="words per caption", ylabel="captions")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.suptitle(f"{title}{notes}")
    _save(figure, out_png)


def plot_top_attributes(
    top: Sequence[tuple[str, int]], images: int, out_png: str | Path, title: str
) -> None:
    """Horizontal bars, the most frequent attribute at the top: images having it."""
    figure, axis = plt.subplots(figsize=(8, max(2.5, 0.22 * len(top) + 1.2)))
    if top:
        names = [name for name, _ in top][::-1]
        counts = [count for _, count in top][::-1]
        bars = axis.barh(names, counts, color="tab:green")
        axis.bar_label(bars, padding=2, fontsize=8)
        axis.set_xlim(0, max(counts) * 1.15)
        axis.tick_params(axis="y", labelsize=8)
        axis.margins(y=0.01)
    else:
        axis.text(0.5, 0.5, "no attributes", ha="center", va="center")
        axis.set_yticks([])
    axis.set(title=f"{title}: {len(top)} most frequent of {images} images", xlabel="images")
    _save(figure, out_png)


def plot_attributes_per_image(
    final: Sequence[int], phase1: Sequence[int], out_png: str | Path, title: str
) -> None:
    """Histogram of final attributes per kept image, with phase 1's count for comparison."""
    figure, axis = plt.subplots(figsize=(8, 3.5))
    if final:
        bins = _integer_bins([*final, *phase1])
        axis.hist(final, bins=bins, color="tab:green", label="final (phase 1 + phase 2)")
        axis.hist(phase1, bins=bins, histtype="step", color="black", label="phase 1 only")
        axis.legend()
        mean = sum(final) / len(final)
        axis.set_title(f"{title}: {len(final)} images, mean {mean:.1f} attributes")
    else:
        axis.text(0.5, 0.5, "no images with attributes", ha="center", va="center")
        axis.set_title(title)
    axis.set(xlabel="attributes per image", ylabel="images")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    _save(figure, out_png)
