"""Build one tiny random demo model (see vlmflow.models)."""

from vlmflow.logs import log_to
from vlmflow.models import DEMO_BUILDERS

with log_to(snakemake.log[0]) as log:
    kind = snakemake.wildcards.kind
    settings = dict(snakemake.params.settings)
    options = {
        "vlm": ("image_size", "patch_size"),
        "vision": ("image_size", "patch_size"),
        "llm": ("delimiter_bias",),
        "lm": (),
    }[kind]
    DEMO_BUILDERS[kind](
        snakemake.output[0], snakemake.params.seed, **{k: settings[k] for k in options}
    )
    log.info("built demo model %s in %s", kind, snakemake.output[0])
