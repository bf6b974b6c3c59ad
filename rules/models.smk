# The demo models are tiny (seconds on one CPU): on a cluster they are built where
# Snakemake runs rather than queued as jobs. Real models are never built here.
localrules:
    demo_model,


rule demo_model:
    output:
        directory("results/models/demo-{kind}"),
    log:
        "logs/demo_model/{kind}.log",
    benchmark:
        "results/benchmarks/demo_model/{kind}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        seed=config["seed"],
        settings=get_demo_model_settings,
        version=DEMO_VERSION,
    script:
        "../workflow/scripts/demo_model.py"
