"""Shuffle one dataset's HDF5 files of one phase across files (see vlmflow.stages.h5_shuffle)."""

from vlmflow.core.contract import read_shard_index
from vlmflow.core.logs import log_to
from vlmflow.stages.h5_shuffle import shuffle_files

with log_to(snakemake.log[0]):
    shuffle_files(
        read_shard_index(snakemake.input[0], f"h5_{snakemake.wildcards.phase}"),
        snakemake.output[0],
        chunks=snakemake.params.chunks,
        seed=snakemake.params.seed,
    )
