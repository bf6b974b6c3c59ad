# Report items that count every stage at once; each reads only the per-shard outputs the
# stages already wrote (stats json, parquet failure columns, the h5 shard json).
localrules:
    funnel,


rule funnel:
    input:
        unpack(get_funnel_inputs),
    output:
        page=report(
            "results/{dataset}/report/funnel.html",
            caption="../workflow/report/funnel.rst",
            category="Ingest",
            labels={"dataset": "{dataset}", "page": "funnel and failures"},
        ),
        figure=report(
            "results/{dataset}/report/funnel.png",
            caption="../workflow/report/funnel.rst",
            category="Ingest",
            labels={"dataset": "{dataset}", "figure": "funnel and failures"},
        ),
    log:
        "logs/funnel/{dataset}.log",
    benchmark:
        "results/benchmarks/funnel/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/funnel.py"
