"""The attribute stages' config checks, run at DAG build (vlmflow.checks): a model no
route can run, a context too short for a prompt."""

from __future__ import annotations

from typing import Any

from vlmflow.core.errors import ConfigError
from vlmflow.families import meta_llama
from vlmflow.stages.attributes.generation import json_needs_transformers, template_tokens


def check_backend(config: dict[str, Any], llm_folder: str) -> None:
    """A Meta-format checkpoint runs on its fairscale path only: not on vLLM, and without
    constrained answers."""
    if not meta_llama.is_meta_checkpoint(llm_folder):
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


def check_context(config: dict[str, Any], llm_folder: str) -> None:
    """Each attribute phase's prompt template, its data and its answer fit the LLM's
    context (``attributes.max_seq_len`` or the model's own)."""
    from transformers import AutoConfig, AutoTokenizer

    from vlmflow.core.prompts import read_prompt

    if meta_llama.is_meta_checkpoint(llm_folder):
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
