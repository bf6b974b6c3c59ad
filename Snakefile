from snakemake.utils import min_version
from vlmflow.core.planning import check_scripts_once_per_rule, relax_garbage_collector

min_version("9.0")

# A 10,000-shard DAG is millions of Python objects: fewer full garbage collections
# while it is built and none over it at exit (vlmflow.core.planning says why).
relax_garbage_collector()
# Snakemake reads a rule's script once for every job to check it exists; once per rule
# is enough when its path has no wildcards (vlmflow.core.planning).
check_scripts_once_per_rule()


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/ingest.smk"
include: "rules/caption.smk"
include: "rules/attributes.smk"
include: "rules/h5.smk"
include: "rules/index.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"
include: "rules/export.smk"


localrules:
    all,


# An input function, so that only a run that plans `all` lists the datasets' shards: a
# Slurm job parses this file again and must not pay for that.
rule all:
    default_target: True
    input:
        get_final_outputs,
