rule ingest:
    input:
        source=get_source_inputs,
    output:
        tar=SHARD_OUTPUTS["shard"],
        stats=SHARD_OUTPUTS["stats"],
    log:
        "logs/ingest/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/ingest/{dataset}/{shard}.tsv"
    conda:
        "../envs/ingest.yaml"
    threads: 1
    params:
        source=get_source_params,
        rows=get_shard_rows,
        settings=get_ingest_settings,
    script:
        "../workflow/scripts/ingest.py"


localrules:
    ingest_summary,


rule ingest_summary:
    input:
        get_ingest_index,
    output:
        report(
            "results/{dataset}/ingest_summary.tsv",
            caption="../workflow/report/ingest.rst",
            category="Ingest",
            labels={"dataset": "{dataset}", "table": "shards"},
        ),
    log:
        "logs/ingest_summary/{dataset}.log",
    conda:
        "../envs/ingest.yaml"
    script:
        "../workflow/scripts/ingest_summary.py"


localrules:
    duplicates,


rule duplicates:
    input:
        unpack(get_duplicates_inputs),
    output:
        report(
            DUPLICATES,
            caption="../workflow/report/duplicates.rst",
            category="Ingest",
            labels={"dataset": "{dataset}", "table": "duplicates and leaks"},
        ),
    log:
        "logs/duplicates/{dataset}.log",
    conda:
        "../envs/ingest.yaml"
    script:
        "../workflow/scripts/duplicates.py"
