rule caption:
    input:
        shard="results/{dataset}/shards/{shard}.tar",
        prompt=config["caption"]["prompt"],
        model=get_model_input("vlm"),
    output:
        "results/{dataset}/captions/{shard}.parquet",
    log:
        "logs/caption/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/caption/{dataset}/{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=60,
    params:
        settings=get_caption_settings,
    script:
        "../workflow/scripts/caption.py"
