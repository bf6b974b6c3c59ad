"""Shuffle one dataset's HDF5 files of one phase across files (see vlmflow.h5_shuffle)."""

from vlmflow.contract import read_shard_index
from vlmflow.h5_shuffle import shuffle_files
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    shuffle_files(
        read_shard_index(snakemake.input[0], f"h5_{snakemake.wildcards.phase}"),
        snakemake.output[0],
        chunks=snakemake.params.chunks,
        seed=snakemake.params.seed,
    )
