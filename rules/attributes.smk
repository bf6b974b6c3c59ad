rule attributes_phase1:
    input:
        captions=SHARD_OUTPUTS["captions"],
        prompt=config["attributes"]["phase1"]["prompt"],
        model=get_model_input("llm"),
    output:
        SHARD_OUTPUTS["phase1"],
    log:
        "logs/attributes_phase1/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/attributes_phase1/{dataset}/{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=60,
    params:
        settings=get_phase1_settings,
    script:
        "../workflow/scripts/attributes.py"


rule attributes_phase2:
    input:
        phase1=SHARD_OUTPUTS["phase1"],
        prompt=config["attributes"]["phase2"]["prompt"],
        model=get_model_input("llm"),
    output:
        SHARD_OUTPUTS["phase2"],
    log:
        "logs/attributes_phase2/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/attributes_phase2/{dataset}/{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        runtime=60,
    params:
        settings=get_phase2_settings,
    script:
        "../workflow/scripts/attributes.py"


localrules:
    dialog_samples,


rule dialog_samples:
    input:
        unpack(get_first_shard_files),
        phase1_prompt=config["attributes"]["phase1"]["prompt"],
        phase2_prompt=config["attributes"]["phase2"]["prompt"],
    output:
        report(
            "results/{dataset}/report/dialogs.html",
            caption="../workflow/report/dialogs.rst",
            category="Attributes",
            labels={"dataset": "{dataset}", "page": "dialog samples"},
        ),
    log:
        "logs/dialog_samples/{dataset}.log",
    benchmark:
        "results/benchmarks/dialog_samples/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        entries=config["report"]["dialog_samples"],
    script:
        "../workflow/scripts/inspect_samples.py"


localrules:
    attribute_stats,
    parse_failures,


rule attribute_stats:
    input:
        unpack(get_attribute_indexes),
    output:
        top=report(
            "results/{dataset}/report/top_attributes.png",
            caption="../workflow/report/top_attributes.rst",
            category="Attributes",
            labels={
                "dataset": "{dataset}",
                "figure": f"top {config['report']['top_attributes']} attributes",
            },
        ),
        per_image=report(
            "results/{dataset}/report/attributes_per_image.png",
            caption="../workflow/report/attributes_per_image.rst",
            category="Attributes",
            labels={"dataset": "{dataset}", "histogram": "attributes per image"},
        ),
    log:
        "logs/attribute_stats/{dataset}.log",
    benchmark:
        "results/benchmarks/attribute_stats/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        top=config["report"]["top_attributes"],
    script:
        "../workflow/scripts/attribute_stats.py"


rule parse_failures:
    input:
        unpack(get_attribute_indexes),
    output:
        report(
            "results/{dataset}/report/parse_failures.html",
            caption="../workflow/report/parse_failures.rst",
            category="Attributes",
            labels={"dataset": "{dataset}", "table": "parse failures"},
        ),
    log:
        "logs/parse_failures/{dataset}.log",
    benchmark:
        "results/benchmarks/parse_failures/{dataset}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        examples=config["report"]["failure_examples"],
    script:
        "../workflow/scripts/parse_failures.py"
