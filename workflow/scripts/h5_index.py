"""key -> file/row metadata, dataset-wide data_params.json and, beside each phase's H5
files, a data_params.json in Cerebras ModelZoo's shape (see vlmflow.h5)."""

from vlmflow.contract import read_shard_index
from vlmflow.h5 import build_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    build_index(
        read_shard_index(snakemake.input[0], "h5"),
        snakemake.output.metadata,
        snakemake.output.data_params,
        out_phase_params={
            "phase1": snakemake.output.phase1_params,
            "phase2": snakemake.output.phase2_params,
        },
        image_dir=snakemake.params.image_dir,
    )
