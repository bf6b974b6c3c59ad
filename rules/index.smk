# One index per dataset and per-shard job, listing that job's outputs for every shard;
# the per-dataset steps read their shards' files through these (vlmflow.core.contract says why).
localrules:
    shard_index,


rule shard_index:
    input:
        get_index_inputs,
    output:
        SHARD_INDEX,
    log:
        "logs/shard_index/{dataset}/{index}.log",
    conda:
        "../envs/ingest.yaml"
    params:
        shards=get_index_shards,
    script:
        "../workflow/scripts/shard_index.py"
