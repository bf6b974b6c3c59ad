rule caption:
    input:
        shard=SHARD_OUTPUTS["shard"],
        prompt=config["caption"]["prompt"],
        model=get_model_input("vlm"),
    output:
        SHARD_OUTPUTS["captions"],
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


localrules:
    caption_gallery,


rule caption_gallery:
    input:
        unpack(get_first_shard_files),
    output:
        report(
            "results/{dataset}/report/gallery.html",
            caption="../workflow/report/gallery.rst",
            category="Captions",
            labels={"dataset": "{dataset}", "page": "gallery"},
        ),
    log:
        "logs/caption_gallery/{dataset}.log",
    benchmark:
        "results/benchmarks/caption_gallery/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        entries=config["report"]["gallery_size"],
    script:
        "../workflow/scripts/inspect_samples.py"


localrules:
    caption_lengths,


rule caption_lengths:
    input:
        get_caption_index,
    output:
        report(
            "results/{dataset}/report/caption_lengths.png",
            caption="../workflow/report/caption_lengths.rst",
            category="Captions",
            labels={"dataset": "{dataset}", "histogram": "caption length"},
        ),
    log:
        "logs/caption_lengths/{dataset}.log",
    benchmark:
        "results/benchmarks/caption_lengths/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/caption_lengths.py"
