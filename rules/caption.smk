rule caption:
    input:
        shard="results/{dataset}/shards/{shard}.tar",
        prompt=config["caption"]["prompt"],
        model=get_model_input("vlm"),
    output:
        "results/{dataset}/captions/{shard}.parquet",
    params:
        settings=get_caption_settings,
    log:
        "logs/caption/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/caption/{dataset}/{shard}.tsv"
    threads: 2
    resources:
        runtime=60,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/caption.py"
