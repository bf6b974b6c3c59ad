"""Attribute stages: an instruct LLM turns captions into clean attribute lists.

Phase 1 extracts objects, attributes and adjective-noun phrases from the web caption and
the VLM caption; phase 2 splits compound phrases into their parts and the two lists are
merged. The model loads through ``AutoModelForCausalLM`` and its own chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from vlmflow.attribute_text import (
    clean_vlm_caption,
    merge_phases,
    parse_list,
    phase1_prompt,
    phase2_prompt,
)
from vlmflow.io import read_parquet_rows, stable_seed, write_rows_parquet
from vlmflow.models import GenerationSettings
from vlmflow.progress import ProgressFile, fingerprint, input_state, progress_path, run_batches
from vlmflow.prompts import prompt_id

log = logging.getLogger(__name__)

PHASE1_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("web_caption", pa.string()),
        ("vlm_caption", pa.string()),
        ("raw_answer", pa.string()),
        ("attributes", pa.list_(pa.string())),
        ("model", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)

PHASE2_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("raw_answer", pa.string()),
        ("phase1_attributes", pa.list_(pa.string())),
        ("phase2_attributes", pa.list_(pa.string())),
        ("attributes", pa.list_(pa.string())),
        ("attribute_sources", pa.list_(pa.string())),
        ("model", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)


@dataclass(frozen=True)
class LLMSettings(GenerationSettings):
    """Generation settings of an attribute phase, plus how its answers are parsed."""

    stop_words: tuple[str, ...] = field(default_factory=tuple)
    max_words: int = 6


def load_llm(settings: LLMSettings) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        settings.model, trust_remote_code=settings.trust_remote_code
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Llama-3 ships without a pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    model = settings.load_pretrained(AutoModelForCausalLM)
    return tokenizer, model


def _chat(tokenizer: Any, prompt: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    )


def length_order(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Prompt indices by token count: batches of similar length waste less on padding."""
    lengths = [
        len(tokenizer(_chat(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts
    ]
    return sorted(range(len(prompts)), key=lambda i: (lengths[i], i))


def answer_batch(
    tokenizer: Any, model: Any, prompts: list[str], settings: LLMSettings
) -> list[str]:
    """Answer each prompt as a one-turn chat, in one generate call (left padding)."""
    kwargs = {
        **settings.generation_kwargs(),
        # Stop on every end-of-turn id the model declares (Llama-3: <|eot_id|> and EOS).
        "eos_token_id": model.generation_config.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    batch = tokenizer(
        [_chat(tokenizer, p) for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    texts = tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [t.strip() for t in texts]


def _answers(
    keys: list[str],
    prompts: list[str],
    settings: LLMSettings,
    phase: str,
    shard_id: str,
    input_path: str | Path,
    out_parquet: str | Path,
) -> dict[str, dict[str, Any]]:
    """{key: {"answer", "failure"}} for every prompt; resumable (see vlmflow.progress)."""
    progress = ProgressFile(
        progress_path(out_parquet),
        fingerprint(phase, asdict(settings), shard_id, input_state(input_path)),
    )
    if all(key in progress.done for key in keys):
        return {key: progress.done[key] for key in keys}
    # Loaded only when there is work left: a finished or empty shard needs no model.
    tokenizer, model = load_llm(settings)

    def run_batch(indices: list[int]) -> list[dict[str, Any]]:
        texts = answer_batch(tokenizer, model, [prompts[i] for i in indices], settings)
        return [
            {"key": keys[i], "answer": text, "failure": None}
            for i, text in zip(indices, texts, strict=True)
        ]

    def failed_row(index: int, error: BaseException) -> dict[str, Any]:
        return {"key": keys[index], "answer": None, "failure": f"generation_error: {error}"}

    return run_batches(
        keys,
        settings.batch_size,
        run_batch,
        failed_row,
        progress,
        seed=(settings.seed, phase, shard_id),
        desc=f"{phase} {shard_id}",
        order=length_order(tokenizer, prompts),
    )


def run_phase1(
    captions_parquet: str | Path, out_parquet: str | Path, settings: LLMSettings, shard_id: str
) -> dict[str, int]:
    rows = read_parquet_rows(captions_parquet)
    todo = [row for row in rows if row["failure"] is None]
    prompts = [
        phase1_prompt(settings.prompt, row["web_caption"], clean_vlm_caption(row["vlm_caption"]))
        for row in todo
    ]
    answer_of = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase1",
        shard_id,
        captions_parquet,
        out_parquet,
    )
    pid = prompt_id(settings.prompt)
    settings_json = _settings_json(settings)
    out: list[dict[str, Any]] = []
    for row in rows:
        if row["failure"] is not None:
            raw: str | None = None
            attributes: list[str] = []
            failure: str | None = "caption_failed"
        elif answer_of[row["key"]]["failure"] is not None:
            raw, attributes, failure = None, [], answer_of[row["key"]]["failure"]
        else:
            raw = answer_of[row["key"]]["answer"]
            parsed = parse_list(raw, settings.stop_words, settings.max_words)
            attributes, failure = parsed.attributes, parsed.failure
        out.append(
            {
                "key": row["key"],
                "web_caption": row["web_caption"],
                "vlm_caption": row["vlm_caption"],
                "raw_answer": raw,
                "attributes": attributes,
                "model": settings.model,
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    write_rows_parquet(out_parquet, out, PHASE1_SCHEMA)
    progress_path(out_parquet).unlink(missing_ok=True)
    return _count(out, shard_id, "phase1")


def run_phase2(
    phase1_parquet: str | Path, out_parquet: str | Path, settings: LLMSettings, shard_id: str
) -> dict[str, int]:
    rows = read_parquet_rows(phase1_parquet)
    todo = [row for row in rows if row["failure"] is None and row["attributes"]]
    prompts = [phase2_prompt(settings.prompt, row["attributes"]) for row in todo]
    answer_of = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase2",
        shard_id,
        phase1_parquet,
        out_parquet,
    )
    pid = prompt_id(settings.prompt)
    settings_json = _settings_json(settings)
    out: list[dict[str, Any]] = []
    for row in rows:
        phase1 = list(row["attributes"] or [])
        answer = answer_of.get(row["key"], {})
        raw = answer.get("answer")
        phase2: list[str] = []
        failure = row["failure"] if row["failure"] is not None else None
        if failure is None and raw is not None:
            # An unparseable phase-2 answer costs only the new elements: the phase-1
            # attributes still stand, so the sample is kept.
            phase2 = parse_list(raw, settings.stop_words, settings.max_words).attributes
        merged = merge_phases(phase1, phase2, stable_seed(settings.seed, row["key"]))
        if failure is None and not merged:
            failure = "no_attributes"
        out.append(
            {
                "key": row["key"],
                "raw_answer": raw,
                "phase1_attributes": phase1,
                "phase2_attributes": phase2,
                "attributes": [m.text for m in merged],
                "attribute_sources": [m.source for m in merged],
                "model": settings.model,
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    write_rows_parquet(out_parquet, out, PHASE2_SCHEMA)
    progress_path(out_parquet).unlink(missing_ok=True)
    return _count(out, shard_id, "phase2")


def _settings_json(settings: LLMSettings) -> str:
    """The settings a row was made with (the prompt is identified by prompt_id)."""
    return json.dumps({k: v for k, v in asdict(settings).items() if k != "prompt"}, sort_keys=True)


def _count(rows: list[dict[str, Any]], shard_id: str, phase: str) -> dict[str, int]:
    failed = sum(1 for r in rows if r["failure"] is not None)
    counts = {"in": len(rows), "ok": len(rows) - failed, "failed": failed}
    log.info("%s shard %s: %s", phase, shard_id, counts)
    return counts
