"""Pack one shard into phase-1 and phase-2 LLaVA HDF5 files (see vlmflow.h5)."""

from vlmflow.h5 import H5Settings, run_shard
from vlmflow.logs import log_to
from vlmflow.stage_versions import without_version

with log_to(snakemake.log[0]):
    run_shard(
        shard_tar=snakemake.input.shard,
        phase1_parquet=snakemake.input.phase1,
        phase2_parquet=snakemake.input.phase2,
        language_model=snakemake.params.language_model,
        vision_tower=snakemake.params.vision_tower,
        settings=H5Settings(**without_version(snakemake.params.settings)),
        shard_id=snakemake.wildcards.shard,
        out_phase1=snakemake.output.phase1,
        out_phase2=snakemake.output.phase2,
        out_images=snakemake.output.images,
        out_params=snakemake.output.params,
        vision_feature_layer=snakemake.params.vision_feature_layer,
    )
