rule evaluate:
    input:
        unpack(get_eval_inputs),
    output:
        predictions="results/eval/{dataset}/predictions.parquet",
        metrics="results/eval/{dataset}/metrics.tsv",
    log:
        "logs/evaluate/{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        runtime=60,
    params:
        settings=get_eval_settings,
    script:
        "../workflow/scripts/evaluate.py"


localrules:
    metrics_table,


rule metrics_table:
    input:
        expand("results/eval/{dataset}/metrics.tsv", dataset=config["eval_datasets"]),
    output:
        report(
            "results/eval/metrics.tsv",
            caption="../workflow/report/eval.rst",
            category="Eval",
            labels={"table": "R/P/F1@k"},
        ),
    log:
        "logs/metrics_table/metrics_table.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/metrics_table.py"


localrules:
    metrics_page,


rule metrics_page:
    input:
        "results/eval/metrics.tsv",
    output:
        report(
            "results/eval/metrics.html",
            caption="../workflow/report/eval.rst",
            category="Eval",
            labels={"page": "R/P/F1@k per dataset and k"},
        ),
    log:
        "logs/metrics_page/metrics_page.log",
    benchmark:
        "results/benchmarks/metrics_page/metrics_page.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/metrics_page.py"
