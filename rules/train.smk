rule train_phase1:
    input:
        unpack(get_train_phase1_inputs),
    output:
        directory("results/train/phase1"),
    log:
        "logs/train/phase1.log",
    benchmark:
        "results/benchmarks/train/phase1.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
    params:
        settings=get_train_settings("phase1"),
        vision_tower=model_param("vision_tower"),
        language_model=model_param("language_model"),
    script:
        "../workflow/scripts/train.py"


rule train_phase2:
    input:
        unpack(get_train_phase2_inputs),
    output:
        directory("results/train/phase2"),
    log:
        "logs/train/phase2.log",
    benchmark:
        "results/benchmarks/train/phase2.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
    params:
        settings=get_train_settings("phase2"),
    script:
        "../workflow/scripts/train.py"


localrules:
    loss_plot,


rule loss_plot:
    input:
        phase1="results/train/phase1",
        phase2="results/train/phase2",
    output:
        report(
            "results/train/loss.png",
            caption="../workflow/report/training.rst",
            category="Training",
            labels={"figure": "loss and learning rate"},
        ),
    log:
        "logs/loss_plot/loss_plot.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/loss_plot.py"
