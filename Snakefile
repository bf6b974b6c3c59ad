from snakemake.utils import min_version
from vlmflow.planning import relax_garbage_collector

min_version("9.0")

# A 10,000-shard DAG is millions of Python objects: fewer full garbage collections
# while it is built and none over it at exit (vlmflow.planning says why).
relax_garbage_collector()


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
