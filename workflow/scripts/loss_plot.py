"""Loss and learning-rate curves of both training phases, for the report."""

from vlmflow.logs import log_to
from vlmflow.plots import plot_training

with log_to(snakemake.log[0]):
    plot_training(
        {"phase 1": snakemake.input.phase1, "phase 2": snakemake.input.phase2},
        snakemake.output[0],
    )
