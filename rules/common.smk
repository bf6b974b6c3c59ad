import os
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

from vlmflow.stages.ingest import IngestError, source_from_config
from vlmflow.core.contract import (
    DUPLICATES,
    H5_FILES,
    INDEXES,
    MARKER,
    PART_MANIFESTS,
    SHARD_INDEX,
    SHARD_OUTPUTS,
)
from vlmflow.checks import DEMO_MODEL, PACKAGED_ENCODER, ConfigError, check_models
from vlmflow.checks import check_config as check_config_values
from vlmflow.core.constrained import JSON_KEYS
from vlmflow.demo.demo_models import DEMO_BUILDERS, DEMO_OPTIONS, DEMO_VERSION
from vlmflow.core.models import resolved_revision
from vlmflow.core.stage_versions import versioned

validate(config, schema="../workflow/schemas/config.schema.yaml")


wildcard_constraints:
    dataset=r"[A-Za-z0-9_-]+",
    # NNNNNN, or TAG_NNNNNN for a URL list in parts (vlmflow.stages.ingest.parts).
    shard=r"(?:[A-Za-z0-9-]+_)?\d{6}",
    kind="|".join(DEMO_BUILDERS),
    phase="phase1|phase2",
    index="|".join(INDEXES),


def check_config():
    """vlmflow.checks.check_config, then every dataset's source; the models once, where
    the DAG is built (Slurm jobs parse the Snakefile again)."""
    for note in check_config_values(config, tuple(DEMO_BUILDERS)):
        if workflow.is_main_process:
            logger.warning(note)
    for name in config["datasets"]:
        get_source(name)
    if workflow.is_main_process:
        check_models(
            config, checked_by_jobs=lambda reference: DEMO_MODEL.match(reference)
        )


def get_demo_model_settings(wildcards):
    return {key: config["demo_models"][key] for key in DEMO_OPTIONS[wildcards.kind]}


_SOURCES = {}


def get_source(dataset):
    """The dataset's source (URL list, image folder, COCO, HF dataset or tars), made once.

    Only the main process may read a URL list part to write its manifest; a job reads
    its own shard's line (vlmflow.stages.ingest.parts), so its start-up does not grow with the list.
    """
    if dataset not in _SOURCES:
        try:
            _SOURCES[dataset] = source_from_config(
                config["datasets"][dataset],
                dataset,
                PART_MANIFESTS.format(dataset=dataset),
                build=workflow.is_main_process,
            )
        except IngestError as exc:
            raise ConfigError(f"config.datasets.{dataset}: {exc}") from None
    return _SOURCES[dataset]


check_config()


_SHARD_IDS = {}


def get_shard_ids(dataset):
    """Shard ids of a dataset (planning only: O(shards), from the part manifests)."""
    if dataset not in _SHARD_IDS:
        source = get_source(dataset)
        shard_size = config["datasets"][dataset]["shard_size"]
        try:
            _SHARD_IDS[dataset] = source.shard_ids(shard_size)
        except IngestError as exc:
            raise ConfigError(f"config.datasets.{dataset}: {exc}") from None
        for note in source.removed_parts():
            logger.warning(
                f"config.datasets.{dataset}.url_list: {note}: its shards are left out of "
                f"the dataset from now on (their files stay under results/{dataset}/; "
                f"delete its manifest in {PART_MANIFESTS.format(dataset=dataset)}/ to "
                "stop this warning)"
            )
    return _SHARD_IDS[dataset]


def get_source_inputs(wildcards):
    # ancient: appending rows to a list (or images to a folder) must not make existing
    # shards stale; the shard's row range and a digest of its rows (params) decide instead.
    source = get_source(wildcards.dataset)
    return [ancient(path) for path in source.shard_inputs(wildcards.shard)]


def get_source_params(wildcards):
    """The dataset's source settings (shard_size acts through the row ranges)."""
    dataset = config["datasets"][wildcards.dataset]
    return {key: value for key, value in dataset.items() if key != "shard_size"}


def get_shard_rows(wildcards):
    """The shard's rows and their digest: in a job, its own manifest line only."""
    shard_size = config["datasets"][wildcards.dataset]["shard_size"]
    try:
        return get_source(wildcards.dataset).shard_rows(wildcards.shard, shard_size)
    except IngestError as exc:
        raise ConfigError(f"config.datasets.{wildcards.dataset}: {exc}") from None


def get_ingest_settings(wildcards):
    dataset = config["datasets"][wildcards.dataset]
    columns = {
        key: dataset.get(key) for key in ("url_column", "caption_column", "key_column")
    }
    return versioned("ingest", {**config["ingest"], **columns})


def model_path(key):
    """The model reference as the stages take it: a folder, or a hub id pinned to the
    commit it resolves to here (org/name@<commit>), so that a new upload of an unpinned
    model, or an edited pin, changes the params of exactly the rules that load it."""
    reference = config["models"][key]
    if key == "similarity_encoder" and reference == PACKAGED_ENCODER:
        from vlmflow.core.models import packaged_minilm_path

        return packaged_minilm_path()
    revision = resolved_revision(reference)
    if revision is not None:
        return f"{reference.split('@')[0]}@{revision}"
    return reference


def get_model_input(key):
    """Demo models are built by a rule, so they are inputs; other models are not files."""
    reference = config["models"][key]
    return [reference] if DEMO_MODEL.match(reference) else []


def sampling_settings(section, model_key):
    settings = dict(section)
    settings.pop("prompt")
    return {
        **settings,
        "model": model_path(model_key),
        "trust_remote_code": config["models"]["trust_remote_code"],
        "seed": config["seed"],
    }


def get_caption_settings(wildcards):
    return versioned("caption", sampling_settings(config["caption"], "vlm"))


def get_phase_settings(phase):
    section = dict(config["attributes"][phase])
    if section["format"] == "text":
        # Only json mode has these: text-mode params stay as they were before it.
        for key in JSON_KEYS:
            section.pop(key)
    settings = {
        **sampling_settings(section, "llm"),
        "stop_words": config["attributes"]["stop_words"],
        "max_words": config["attributes"]["max_words"],
        "max_seq_len": config["attributes"]["max_seq_len"],
    }
    return versioned(f"attributes_{phase}", settings)


def get_phase1_settings(wildcards):
    return get_phase_settings("phase1")


def get_phase2_settings(wildcards):
    return get_phase_settings("phase2")


def shard_index(dataset, index):
    """The index file listing a per-shard job's outputs for every shard of a dataset
    (vlmflow.core.contract.INDEXES); per-dataset steps read their shards' files through it.
    """
    return SHARD_INDEX.format(dataset=dataset, index=index)


def get_index_inputs(wildcards):
    """One output per shard of the indexed job: the job writes the others with it."""
    return expand(
        INDEXES[wildcards.index][MARKER[wildcards.index]],
        dataset=wildcards.dataset,
        shard=get_shard_ids(wildcards.dataset),
    )


def get_index_shards(wildcards):
    return get_shard_ids(wildcards.dataset)


def get_ingest_index(wildcards):
    return shard_index(wildcards.dataset, "ingest")


def get_duplicates_inputs(wildcards):
    """A dataset's ingest index (its stats files) and, for an eval dataset, the train
    datasets' ones."""
    train = []
    if wildcards.dataset not in config["train_datasets"]:
        for dataset in config["train_datasets"]:
            train.append(shard_index(dataset, "ingest"))
    return {"stats": get_ingest_index(wildcards), "train_stats": train}


def get_h5_index(wildcards):
    return shard_index(wildcards.dataset, "h5")


def get_caption_index(wildcards):
    return shard_index(wildcards.dataset, "captions")


def get_attribute_indexes(wildcards):
    """The indexes of a dataset's phase-1 and phase-2 attribute parquets."""
    return {
        phase: shard_index(wildcards.dataset, phase) for phase in ("phase1", "phase2")
    }


def get_funnel_inputs(wildcards):
    """Every per-shard output a dataset's funnel counts; h5 ones for train datasets only."""
    in_h5 = wildcards.dataset in config["train_datasets"]
    return {
        "stats": get_ingest_index(wildcards),
        "captions": get_caption_index(wildcards),
        **get_attribute_indexes(wildcards),
        "h5": get_h5_index(wildcards) if in_h5 else [],
        "duplicates": DUPLICATES.format(dataset=wildcards.dataset),
    }


def get_train_inputs(phase):
    """The h5 indexes of the train datasets (each lists its phase-N files and image
    folders)."""
    return {"h5": [shard_index(dataset, "h5") for dataset in config["train_datasets"]]}


def get_train_phase1_inputs(wildcards):
    return {
        **get_train_inputs("phase1"),
        "vision_tower": get_model_input("vision_tower"),
        "language_model": get_model_input("language_model"),
    }


def get_train_phase2_inputs(wildcards):
    return {**get_train_inputs("phase2"), "init": "results/train/phase1"}


def get_train_settings(phase):
    settings = {
        **config["train"][phase],
        "phase": int(phase[-1]),
        "seed": config["seed"],
        "vision_feature_layer": config["train"]["vision_feature_layer"],
        "projector": config["train"]["projector"],
        "language_model_layers": config["train"]["language_model_layers"],
    }
    return versioned(f"train_{phase}", settings)


def get_eval_inputs(wildcards):
    return {
        "model": "results/train/phase2",
        "shards": shard_index(wildcards.dataset, "ingest"),
        "attributes": shard_index(wildcards.dataset, "phase2"),
        "duplicates": DUPLICATES.format(dataset=wildcards.dataset),
    }


def get_eval_settings(wildcards):
    settings = {
        **config["eval"],
        "instruction": config["h5"]["instruction"],
        "phase2_style": config["h5"]["phase2_style"],
        "similarity_encoder": model_path("similarity_encoder"),
    }
    return versioned("evaluate", settings)


def get_first_shard_files(wildcards):
    """The first shard's files, for the gallery and the dialog samples of a dataset."""
    dataset, shard = wildcards.dataset, get_shard_ids(wildcards.dataset)[0]
    return {
        "shard": SHARD_OUTPUTS["shard"].format(dataset=dataset, shard=shard),
        "captions": SHARD_OUTPUTS["captions"].format(dataset=dataset, shard=shard),
        "phase1": SHARD_OUTPUTS["phase1"].format(dataset=dataset, shard=shard),
        "phase2": SHARD_OUTPUTS["phase2"].format(dataset=dataset, shard=shard),
    }


def get_h5_feature_layer():
    """The vision layer stored in phase-1 files, or None (then editing it reruns no h5)."""
    if config["h5"]["vision_features"]:
        return config["train"]["vision_feature_layer"]
    return None


# The report items of each dataset, under results/{dataset}/report/.
REPORT_FILES = [
    "funnel.html",
    "funnel.png",
    "gallery.html",
    "caption_lengths.png",
    "top_attributes.png",
    "attributes_per_image.png",
    "parse_failures.html",
    "dialogs.html",
]


def get_final_outputs(wildcards):
    """Every file of the data contract, so that a deleted one is made again.

    Per-shard files are listed although per-dataset steps read them all: Snakemake
    remakes a missing file only for a job that has to run or for a target, so a deleted
    shard file whose readers are up to date would otherwise stay missing. Only the
    missing ones need listing (per_shard_targets): at 100,000 shards the rest would be
    close to a million more files for Snakemake to match to jobs.
    """
    outputs = [
        "results/eval/metrics.tsv",
        "results/eval/metrics.html",
        "results/train/loss.png",
    ]
    for dataset in config["datasets"]:
        outputs.append(f"results/{dataset}/ingest_summary.tsv")
        outputs.append(DUPLICATES.format(dataset=dataset))
        if get_shard_ids(dataset):
            outputs += expand(
                "results/{dataset}/report/{name}",
                dataset=dataset,
                name=REPORT_FILES,
            )
            outputs.append(f"results/export/{dataset}/hf")
        # Each per-shard job's outputs, with the index that lists them.
        for index in ("ingest", "captions", "phase1", "phase2"):
            outputs += per_shard_targets(
                dataset, INDEXES[index].values(), shard_index(dataset, index)
            )
    for dataset in config["train_datasets"]:
        if config["h5_shuffle"]["chunks"] > 0:
            outputs += expand(
                "results/{dataset}/h5/shuffled/{phase}",
                dataset=dataset,
                phase=["phase1", "phase2"],
            )
        outputs += expand(
            "results/{dataset}/h5/{name}.json",
            dataset=dataset,
            name=[
                "metadata",
                "data_params",
                "phase1/data_params",
                "phase2/data_params",
            ],
        )
        if get_shard_ids(dataset):
            outputs += expand(
                "results/export/{dataset}/{name}",
                dataset=dataset,
                name=["llava.json", "llava.md"],
            )
        outputs += per_shard_targets(
            dataset, INDEXES["h5"].values(), shard_index(dataset, "h5")
        )
    return outputs


def per_shard_targets(dataset, patterns, index):
    """The per-shard files (patterns: the outputs of a rule) that `all` lists for a
    dataset: those missing now, and none while the rule has written nothing yet and
    its index is missing too.

    An existing file needs no target: its job is in the DAG anyway, through the index
    that lists it (which per-dataset steps in `all` read), and reruns when stale. A
    missing one needs one unless the index is certain to be made and ask for it: while
    the index is missing, it is made, and every shard's job whose outputs are all missing
    runs with it.
    """
    shards = get_shard_ids(dataset)
    folders = {}
    for pattern in patterns:
        folder = os.path.dirname(pattern.format(dataset=dataset, shard="0"))
        if folder not in folders:
            try:
                folders[folder] = set(os.listdir(folder))
            except FileNotFoundError:
                folders[folder] = None
    if all(names is None for names in folders.values()) and not os.path.exists(index):
        return []
    targets = []
    for pattern in patterns:
        for shard in shards:
            path = pattern.format(dataset=dataset, shard=shard)
            names = folders[os.path.dirname(path)]
            if names is None or os.path.basename(path) not in names:
                targets.append(path)
    return targets


def model_param(key):
    """A params entry for a model reference: a demo model's folder comes from the input
    (an input function; the folder's files are tracked as input), any other model is the
    pinned reference itself. It must be a plain value: Snakemake records, and compares on
    a rerun, only params that do not depend on the input."""
    if DEMO_MODEL.match(config["models"][key]):
        return lambda wildcards, input: input[key][0]
    return model_path(key)


def get_export_llava_inputs(wildcards):
    """The phase-2 parquets and the image folders the h5 jobs wrote, through their
    indexes; the samples duplicates.tsv names are left out."""
    return {
        "duplicates": DUPLICATES.format(dataset=wildcards.dataset),
        "phase2": shard_index(wildcards.dataset, "phase2"),
        "h5": shard_index(wildcards.dataset, "h5"),
    }


def get_export_hf_inputs(wildcards):
    """What the funnel counts (the card's counts; duplicates.tsv, whose samples are left
    out, among them; the ingest index lists the shards, i.e. the images) and the
    prompts."""
    return {
        **get_funnel_inputs(wildcards),
        "caption_prompt": config["caption"]["prompt"],
        "phase1_prompt": config["attributes"]["phase1"]["prompt"],
        "phase2_prompt": config["attributes"]["phase2"]["prompt"],
    }


def get_llava_export(wildcards):
    """The LLaVA export of a train dataset, which its HF card points to; None otherwise."""
    if wildcards.dataset in config["train_datasets"]:
        return f"results/export/{wildcards.dataset}/llava.json"
    return None


def get_export_runtime(wildcards, attempt):
    """Minutes for a dataset-wide export job: it reads every shard once."""
    return attempt * (30 + len(get_shard_ids(wildcards.dataset)))
