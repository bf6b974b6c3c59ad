rule h5:
    input:
        shard=SHARD_OUTPUTS["shard"],
        phase1=SHARD_OUTPUTS["phase1"],
        phase2=SHARD_OUTPUTS["phase2"],
        language_model=get_model_input("language_model"),
        vision_tower=get_model_input("vision_tower"),
    output:
        phase1=H5_FILES["phase1"],
        phase2=H5_FILES["phase2"],
        images=directory(H5_FILES["images"]),
        params=SHARD_OUTPUTS["h5"],
    log:
        "logs/h5/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/h5/{dataset}/{shard}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        settings=versioned("h5", config["h5"]),
        language_model=model_param("language_model"),
        vision_tower=model_param("vision_tower"),
        vision_feature_layer=get_h5_feature_layer(),
    script:
        "../workflow/scripts/h5.py"


localrules:
    h5_index,


rule h5_index:
    input:
        get_h5_index,
    output:
        metadata="results/{dataset}/h5/metadata.json",
        data_params="results/{dataset}/h5/data_params.json",
        # Cerebras readers look for data_params.json beside the H5 files.
        phase1_params="results/{dataset}/h5/phase1/data_params.json",
        phase2_params="results/{dataset}/h5/phase2/data_params.json",
    log:
        "logs/h5_index/{dataset}.log",
    conda:
        "../envs/torch.yaml"
    params:
        image_dir="results/{dataset}/h5/images",
    script:
        "../workflow/scripts/h5_index.py"


rule h5_shuffle:
    input:
        get_h5_index,
    output:
        directory("results/{dataset}/h5/shuffled/{phase}"),
    log:
        "logs/h5_shuffle/{dataset}/{phase}.log",
    benchmark:
        "results/benchmarks/h5_shuffle/{dataset}/{phase}.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        chunks=config["h5_shuffle"]["chunks"],
        seed=config["seed"],
    script:
        "../workflow/scripts/h5_shuffle.py"
