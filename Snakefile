from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/ingest.smk"
include: "rules/caption.smk"
include: "rules/attributes.smk"
include: "rules/h5.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        get_final_outputs(),
