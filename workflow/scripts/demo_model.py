"""Build one tiny random demo model (see vlmflow.models)."""

from vlmflow.demo_models import DEMO_BUILDERS
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    build = DEMO_BUILDERS[snakemake.wildcards.kind]
    build(snakemake.output[0], snakemake.params.seed, **snakemake.params.settings)
    log.info("built demo model %s in %s", snakemake.wildcards.kind, snakemake.output[0])
