"""Attribute stages: an instruct LLM turns captions into clean attribute lists.

Phase 1 extracts objects, attributes and adjective-noun phrases from the web caption and
the VLM caption; phase 2 splits compound phrases into their parts and the two lists are
merged. A transformers model loads through ``AutoModelForCausalLM`` and its own chat
template; a checkpoint in Meta's own format (consolidated.NN.pth, params.json, tiktoken
tokenizer.model) runs on vlmflow.families.meta_llama, one model-parallel process per
consolidated file, started by ``launch`` (torchrun unless the profile names a launcher).

The package: settings (LLMSettings, the output columns), generation (answers on
transformers, a Meta-format checkpoint or vLLM), phases (the jobs), checks (config
checks at DAG build).
"""

from vlmflow.stages.attributes.checks import check_backend, check_context
from vlmflow.stages.attributes.generation import (
    SharedPrefix,
    answer_batch,
    chat_ids,
    json_needs_transformers,
    length_order,
    load_llm,
    load_tokenizer,
    shared_prefix,
    template_tokens,
)
from vlmflow.stages.attributes.phases import PhaseJob, launch, main, run_phase1, run_phase2
from vlmflow.stages.attributes.settings import PHASE1_SCHEMA, PHASE2_SCHEMA, LLMSettings

__all__ = [
    "PHASE1_SCHEMA",
    "PHASE2_SCHEMA",
    "LLMSettings",
    "PhaseJob",
    "SharedPrefix",
    "answer_batch",
    "chat_ids",
    "check_backend",
    "check_context",
    "json_needs_transformers",
    "launch",
    "length_order",
    "load_llm",
    "load_tokenizer",
    "main",
    "run_phase1",
    "run_phase2",
    "shared_prefix",
    "template_tokens",
]
