"""key -> file/row metadata and dataset-wide data_params.json (see vlmflow.h5)."""

from vlmflow.h5 import build_index
from vlmflow.logs import log_to

with log_to(snakemake.log[0]):
    build_index(list(snakemake.input), snakemake.output.metadata, snakemake.output.data_params)
