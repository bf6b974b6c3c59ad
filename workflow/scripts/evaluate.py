"""Predict labels for one eval dataset and score them (see vlmflow.evaluate)."""

from vlmflow import evaluate
from vlmflow.contract import read_duplicates, read_shard_index
from vlmflow.logs import log_to
from vlmflow.stage_versions import without_version

with log_to(snakemake.log[0]):
    params = without_version(snakemake.params.settings)
    similarity_encoder = params.pop("similarity_encoder")
    settings = evaluate.EvalSettings(
        instruction=params["instruction"],
        top_k=tuple(params["top_k"]),
        max_new_tokens=params["max_new_tokens"],
        batch_size=params["batch_size"],
        decoding=params["decoding"],
        label_max_tokens=params["label_max_tokens"],
        phase2_style=params["phase2_style"],
    )
    evaluate.run(
        model_dir=snakemake.input.model,
        shard_tars=read_shard_index(snakemake.input.shards, "shard"),
        phase2_parquets=read_shard_index(snakemake.input.attributes, "phase2"),
        similarity_encoder=similarity_encoder,
        settings=settings,
        dataset=snakemake.wildcards.dataset,
        out_predictions=snakemake.output.predictions,
        out_metrics=snakemake.output.metrics,
        left_out=read_duplicates(snakemake.input.duplicates),
    )
