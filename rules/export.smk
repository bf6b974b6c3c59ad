# Exports users train from (vlmflow.stages.export, docs/data.md "Exports"): one job per dataset
# and export, reading the per-shard outputs the stages already wrote.
rule export_llava:
    input:
        unpack(get_export_llava_inputs),
    output:
        # Not in the report: Snakemake would embed the whole file (its card is there).
        conversations="results/export/{dataset}/llava.json",
        card=report(
            "results/export/{dataset}/llava.md",
            caption="../workflow/report/export_llava.rst",
            category="Exports",
            labels={"dataset": "{dataset}", "export": "LLaVA card"},
        ),
    log:
        "logs/export_llava/{dataset}.log",
    benchmark:
        "results/benchmarks/export_llava/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        instruction=config["h5"]["instruction"],
        phase2_style=config["h5"]["phase2_style"],
        image_root="results/{dataset}/h5/images",
    script:
        "../workflow/scripts/export_llava.py"


rule export_hf:
    input:
        unpack(get_export_hf_inputs),
    output:
        report(
            directory("results/export/{dataset}/hf"),
            patterns=["{card}.md"],
            caption="../workflow/report/export_hf.rst",
            category="Exports",
            labels={"dataset": "{dataset}", "export": "Hugging Face dataset card"},
        ),
    log:
        "logs/export_hf/{dataset}.log",
    benchmark:
        "results/benchmarks/export_hf/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        runtime=get_export_runtime,
    params:
        source=get_source_params,
        llava=get_llava_export,
    script:
        "../workflow/scripts/export_hf.py"
