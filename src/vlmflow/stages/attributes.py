"""Attribute stages: an instruct LLM turns captions into clean attribute lists.

Phase 1 extracts objects, attributes and adjective-noun phrases from the web caption and
the VLM caption; phase 2 splits compound phrases into their parts and the two lists are
merged. A transformers model loads through ``AutoModelForCausalLM`` and its own chat
template; a checkpoint in Meta's own format (consolidated.NN.pth, params.json, tiktoken
tokenizer.model) runs on vlmflow.families.meta_llama, one model-parallel process per
consolidated file, started by ``launch`` (torchrun unless the profile names a launcher).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import torch

from vlmflow.core import constrained, distributed, engine
from vlmflow.core.attribute_text import (
    clean_vlm_caption,
    merge_phases,
    parse_list,
    phase1_prompt,
    phase2_prompt,
)
from vlmflow.core.errors import ConfigError
from vlmflow.core.io import read_json, read_parquet_rows, stable_seed, write_rows_parquet
from vlmflow.core.models import GenerationSettings, device, hf_engine, pretrained, torch_dtype
from vlmflow.core.progress import (
    BATCH_ERRORS,
    ProgressFile,
    fingerprint,
    input_state,
    progress_path,
    run_batches,
    run_stream,
)
from vlmflow.core.prompts import prompt_id
from vlmflow.families import meta_llama

log = logging.getLogger(__name__)

PHASE1_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("web_caption", pa.string()),
        ("vlm_caption", pa.string()),
        ("raw_answer", pa.string()),
        ("attributes", pa.list_(pa.string())),
        ("model", pa.string()),
        # The backend that generated the row and its version: "transformers 5.23.0",
        # "vllm 0.32.0"; None where nothing was generated.
        ("engine", pa.string()),
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
        # Why phase 2 added nothing to a kept sample (generation_error, refused, ...).
        ("phase2_failure", pa.string()),
        ("model", pa.string()),
        # The backend that generated the row and its version: "transformers 5.23.0",
        # "vllm 0.32.0"; None where nothing was generated.
        ("engine", pa.string()),
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
    # Prompt + answer tokens at most (Meta's reference code: max_seq_len); None: the
    # model's own context. A prompt that leaves no room for max_new_tokens fails as
    # "prompt_too_long" without being generated.
    max_seq_len: int | None = None
    # "text": free answers, parsed; "json": answers constrained to a JSON array of at most
    # max_items strings of at most max_item_chars characters (vlmflow.core.constrained).
    format: str = "text"
    max_items: int = 32
    max_item_chars: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in constrained.FORMATS:
            raise ValueError(f"format {self.format!r}: expected one of {constrained.FORMATS}")

    def list_shape(self, phase: str) -> constrained.ListShape | None:
        """The bounds answers are constrained to; None in text mode."""
        if self.format != "json":
            return None
        return constrained.phase_shape(phase, self.max_items, self.max_item_chars)

    def recorded(self) -> dict[str, Any]:
        """The settings rows and progress files record (the prompt has its prompt_id); a
        text-mode phase records no json-mode keys, as before json mode existed."""
        hidden = {"prompt", *constrained.JSON_KEYS} if self.format == "text" else {"prompt"}
        return {k: v for k, v in asdict(self).items() if k not in hidden}


def special_tokens(settings: LLMSettings) -> list[str]:
    """The model's own special tokens, which the answer parser strips (vlmflow.core.answers)."""
    if meta_llama.is_meta_checkpoint(settings.model):
        return meta_llama.special_token_names()
    return tokenizer_special_tokens(load_tokenizer(settings))


def tokenizer_special_tokens(tokenizer: Any) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    own = {token.content for token in added if getattr(token, "special", False)}
    return sorted(own | set(getattr(tokenizer, "all_special_tokens", [])))


def load_tokenizer(settings: LLMSettings) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        **pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Llama-3 ships without a pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(settings: LLMSettings) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    return load_tokenizer(settings), settings.load_pretrained(AutoModelForCausalLM)


def _chat(tokenizer: Any, prompt: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    )


def chat_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as a one-turn chat, as answer_batch feeds it."""
    return [
        list(tokenizer(_chat(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts
    ]


def template_tokens(tokenizer: Any, template: str, phase: str) -> int:
    """Tokens of a phase's prompt template with empty data, in the model's chat format."""
    empty = phase1_prompt(template, "", "") if phase == "phase1" else phase2_prompt(template, [])
    return len(chat_ids(tokenizer, [empty])[0])


def order_by_length(lengths: list[int], indices: list[int] | None = None) -> list[int]:
    """Indices (``indices[j]`` for ``lengths[j]``, default ``j``) by length: batches of
    similar length waste less on padding."""
    named = list(range(len(lengths))) if indices is None else indices
    return [named[j] for j in sorted(range(len(lengths)), key=lambda j: (lengths[j], named[j]))]


def length_order(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Prompt indices by token count."""
    return order_by_length([len(ids) for ids in chat_ids(tokenizer, prompts)])


@dataclass
class SharedPrefix:
    """The tokens every prompt of a shard starts with (the chat header and the template's
    instructions) and the model's key/value cache for them, computed once per shard."""

    ids: list[int]
    cache: Any  # a transformers Cache


# Below this many shared tokens the copy of the cache costs more than it saves.
MIN_SHARED_PREFIX = 32


def shared_prefix(model: Any, rows: list[list[int]]) -> SharedPrefix | None:
    """The longest prefix all prompts' token ids ``rows`` (see chat_ids) share, with its
    cache; None when they share too little. Each prompt keeps at least one token."""
    if not rows:
        return None
    length = 0
    shortest = min(len(row) for row in rows)
    while length < shortest - 1 and len({row[length] for row in rows}) == 1:
        length += 1
    if length < MIN_SHARED_PREFIX:
        return None
    ids = rows[0][:length]
    try:
        with torch.inference_mode():
            output = model(torch.tensor([ids], device=model.device), use_cache=True)
    except BATCH_ERRORS as error:  # e.g. out of memory: plain batches still work
        log.warning("shared prompt prefix not cached (%s); padding whole prompts", error)
        return None
    log.info("shared prompt prefix: %d tokens computed once for all prompts", length)
    return SharedPrefix(ids, output.past_key_values)


def answer_batch(
    tokenizer: Any,
    model: Any,
    prompts: list[str],
    settings: LLMSettings,
    prefix: SharedPrefix | None = None,
    constraint: constrained.HFConstraint | None = None,
) -> list[str]:
    """Answer each prompt as a one-turn chat, in one generate call (constrained to a
    JSON list by ``constraint``, see vlmflow.core.constrained).

    Without ``prefix`` the prompts are left-padded. With it, generation starts from a copy
    of the prefix's cache and only the rest of each prompt is computed: rows are laid out
    as prefix, padding, own tokens, with the padding masked out (positions come from the
    attention mask, so every token keeps the position it has in the unpadded prompt).
    """
    kwargs = {
        **settings.generation_kwargs(),
        # Stop on every end-of-turn id the model declares (Llama-3: <|eot_id|> and EOS).
        "eos_token_id": model.generation_config.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if constraint is not None:
        kwargs |= constraint.generate_kwargs()
    chats = [_chat(tokenizer, p) for p in prompts]
    if prefix is not None:
        rows = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
        size = len(prefix.ids)
        if all(row[:size] == prefix.ids and len(row) > size for row in rows):
            return _answer_after_prefix(tokenizer, model, rows, prefix, kwargs)
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(
        model.device
    )
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    texts = tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [t.strip() for t in texts]


def _answer_after_prefix(
    tokenizer: Any,
    model: Any,
    rows: list[list[int]],
    prefix: SharedPrefix,
    kwargs: dict[str, Any],
) -> list[str]:
    size = len(prefix.ids)
    own = [row[size:] for row in rows]
    width = max(len(tokens) for tokens in own)
    pad = tokenizer.pad_token_id
    input_ids = [[*prefix.ids, *[pad] * (width - len(tokens)), *tokens] for tokens in own]
    mask = [[1] * size + [0] * (width - len(tokens)) + [1] * len(tokens) for tokens in own]
    # generate() extends the cache it is given: each batch gets its own copy.
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(len(rows))
    with torch.inference_mode():
        output = model.generate(
            input_ids=torch.tensor(input_ids, device=model.device),
            attention_mask=torch.tensor(mask, device=model.device),
            past_key_values=cache,
            **kwargs,
        )
    texts = tokenizer.batch_decode(output[:, size + width :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def json_needs_transformers(model: str, phase: str) -> str:
    return (
        f"config.attributes.{phase}.format: json constrains answers through transformers or "
        f"vLLM; {model} is a Meta-format checkpoint (consolidated.NN.pth), which runs on "
        "vlmflow.families.meta_llama without constraints: point models.llm at the model's "
        "transformers folder, or use format: text"
    )


# A Meta-format checkpoint's context: Llama 3's 8192 tokens.
META_MAX_SEQ_LEN = 8192


def load_meta_llm(settings: LLMSettings) -> meta_llama.MetaLlama:
    unsupported = [
        name for name in ("attn_implementation", "device_map") if getattr(settings, name)
    ]
    if unsupported:
        raise ValueError(
            f"{settings.model} is a Meta-format checkpoint: {' and '.join(unsupported)} "
            "apply to transformers models only (model parallelism follows its "
            "consolidated.NN.pth files); remove them or convert the checkpoint"
        )
    return meta_llama.MetaLlama.load(
        settings.model,
        torch_dtype(settings.dtype, device()),
        max_seq_len=settings.max_seq_len or META_MAX_SEQ_LEN,
    )


# Prompt indices in, (index, answer or the error of that prompt) out as answers arrive.
AnswerStream = Callable[[list[int]], Iterator[tuple[int, str | BaseException]]]


@dataclass(frozen=True)
class Generator:
    """A loaded model's answer function: ``answer`` (prompt indices in, answers out, a
    batch at a time) or ``stream`` (an engine's window of requests); each prompt's token
    count, the context, and the engine that answers (recorded in every row)."""

    answer: Callable[[list[int]], list[str]] | None
    lengths: list[int]
    context: int
    engine: str
    special_tokens: list[str] = field(default_factory=list)  # for parse_list
    stream: AnswerStream | None = None
    window: int = 1  # stream: requests in flight, and rows saved to the progress file at once

    def too_long(self, index: int, max_new_tokens: int) -> bool:
        return self.lengths[index] + max_new_tokens > self.context


def _generator(
    settings: LLMSettings,
    prompts: list[str],
    keys: list[str],
    seed: tuple[Any, ...],
    stack: ExitStack,
    deployment: engine.Deployment | None,
) -> Generator:
    """The answer function of ``settings.backend`` for ``prompts`` (the vLLM engine is
    started on ``stack``), the prompts' lengths and the context. ``seed`` is (config
    seed, phase, shard id)."""
    shape = settings.list_shape(seed[1])
    if settings.backend == "vllm":
        return _vllm_generator(settings, prompts, keys, seed, stack, deployment, shape)
    if meta_llama.is_meta_checkpoint(settings.model):
        if shape is not None:
            raise ValueError(json_needs_transformers(settings.model, seed[1]))
        llm = load_meta_llm(settings)
        options: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
        }
        if settings.do_sample:
            options |= {"temperature": settings.temperature, "top_p": settings.top_p}

        def answer_meta(indices: list[int]) -> list[str]:
            return llm.chat([prompts[i] for i in indices], **options)

        context = settings.max_seq_len or META_MAX_SEQ_LEN
        return Generator(
            answer_meta,
            llm.prompt_lengths(prompts),
            context,
            f"meta_llama torch {torch.__version__}",
            meta_llama.special_token_names(),
        )
    tokenizer, model = load_llm(settings)
    rows = chat_ids(tokenizer, prompts)  # once: for the shared prefix and the batch order
    prefix = shared_prefix(model, rows)
    constraint = None if shape is None else constrained.hf_constraint(tokenizer, model, shape)

    def answer_hf(indices: list[int]) -> list[str]:
        batch = [prompts[i] for i in indices]
        return answer_batch(tokenizer, model, batch, settings, prefix, constraint)

    own = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 1 << 30)
    context = min(settings.max_seq_len or own, own)
    lengths = [len(ids) for ids in rows]
    return Generator(answer_hf, lengths, context, hf_engine(), tokenizer_special_tokens(tokenizer))


def _vllm_generator(
    settings: LLMSettings,
    prompts: list[str],
    keys: list[str],
    seed: tuple[Any, ...],
    stack: ExitStack,
    deployment: engine.Deployment | None,
    shape: constrained.ListShape | None,
) -> Generator:
    """Requests to the vLLM engine: the HF path's chat-formatted token ids, one seed per
    key (constrained to ``shape`` by vLLM's structured outputs)."""
    if meta_llama.is_meta_checkpoint(settings.model):
        raise ValueError(
            f"{settings.model} is a Meta-format checkpoint, which the vllm backend cannot "
            "load: point models.llm at the model's transformers folder (e.g. "
            "meta-llama/Meta-Llama-3-8B-Instruct, not its original/ folder) or use "
            "backend: hf"
        )
    from transformers import AutoConfig

    # The engine loads while the prompts are made.
    session = engine.open_session(settings, deployment, stack, shape)
    options = session.options
    tokenizer = load_tokenizer(settings)
    rows = chat_ids(tokenizer, prompts)

    def seed_of(index: int) -> int:
        return stable_seed(*seed, keys[index])

    def answers_vllm(indices: list[int]) -> Iterator[tuple[int, str | BaseException]]:
        answers = engine.stream_completions(session, rows.__getitem__, seed_of, indices)
        return engine.decoded(answers, tokenizer)

    config = AutoConfig.from_pretrained(
        **pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
    )
    own = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
    context = min(options.max_model_len or own, settings.max_seq_len or own, own)
    engine_name = f"vllm {session.engine.version}"
    lengths = [len(r) for r in rows]
    return Generator(
        None,
        lengths,
        context,
        engine_name,
        tokenizer_special_tokens(tokenizer),
        stream=answers_vllm,
        window=session.window,
    )


def _answers(
    keys: list[str],
    prompts: list[str],
    settings: LLMSettings,
    phase: str,
    shard_id: str,
    input_path: str | Path,
    out_parquet: str | Path,
    deployment: engine.Deployment | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{key: {"answer", "failure", "engine"}} for every prompt, resumable (see
    vlmflow.core.progress), and the model's special tokens (for parse_list).

    With a model-parallel Meta checkpoint every rank runs this in step; only rank 0
    writes the progress file.
    """
    recorded = settings.recorded() | {"prompt": settings.prompt}
    progress = ProgressFile(
        progress_path(out_parquet),
        fingerprint(phase, recorded, shard_id, input_state(input_path)),
        read_only=not distributed.rank_from_env().is_main,
    )
    if all(key in progress.done for key in keys):
        markers = special_tokens(settings) if keys else []
        return {key: progress.done[key] for key in keys}, markers
    seed = (settings.seed, phase, shard_id)
    with ExitStack() as stack:
        # Loaded only when there is work left: a finished or empty shard needs no model.
        generator = _generator(settings, prompts, keys, seed, stack, deployment)
        too_long = _too_long(generator, keys, settings, phase, shard_id)
        fits = [i for i in range(len(keys)) if keys[i] not in too_long]

        def answered(index: int, text: str) -> dict[str, Any]:
            return {"key": keys[index], "answer": text, "failure": None, "engine": generator.engine}

        def failed_row(index: int, error: BaseException) -> dict[str, Any]:
            failure = f"generation_error: {error}"
            return {"key": keys[index], "answer": None, "failure": failure, "engine": None}

        order = order_by_length([generator.lengths[i] for i in fits], fits)
        desc = f"{phase} {shard_id}"
        if generator.stream is not None:
            stream, window = generator.stream, generator.window
            done = run_stream(keys, stream, answered, failed_row, progress, desc, order, window)
        else:
            answer = generator.answer
            assert answer is not None

            def run_batch(indices: list[int]) -> list[dict[str, Any]]:
                texts = answer(indices)
                return [answered(i, text) for i, text in zip(indices, texts, strict=True)]

            done = run_batches(
                keys, settings.batch_size, run_batch, failed_row, progress, seed, desc, order
            )
    return {**done, **too_long}, generator.special_tokens


def _too_long(
    generator: Generator, keys: list[str], settings: LLMSettings, phase: str, shard_id: str
) -> dict[str, dict[str, Any]]:
    """Rows of the prompts that leave no room for the answer; an error when all do."""
    too_long = {
        keys[i]: {"key": keys[i], "answer": None, "failure": "prompt_too_long", "engine": None}
        for i in range(len(keys))
        if generator.too_long(i, settings.max_new_tokens)
    }
    if too_long and len(too_long) == len(keys):
        raise ValueError(
            f"{phase} {shard_id}: every prompt leaves no room for "
            f"attributes.{phase}.max_new_tokens = {settings.max_new_tokens} in a context of "
            f"{generator.context} tokens (attributes.max_seq_len or the model's own); raise "
            "attributes.max_seq_len, or lower max_new_tokens or shorten the template"
        )
    if too_long:
        log.warning(
            "%s %s: %d prompts leave no room for %d new tokens in a context of %d",
            phase,
            shard_id,
            len(too_long),
            settings.max_new_tokens,
            generator.context,
        )
    return too_long


def run_phase1(
    captions_parquet: str | Path,
    out_parquet: str | Path,
    settings: LLMSettings,
    shard_id: str,
    deployment: engine.Deployment | None = None,
) -> dict[str, int]:
    rows = read_parquet_rows(captions_parquet)
    todo = [row for row in rows if row["failure"] is None]
    prompts = [
        phase1_prompt(settings.prompt, row["web_caption"], clean_vlm_caption(row["vlm_caption"]))
        for row in todo
    ]
    answer_of, markers = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase1",
        shard_id,
        captions_parquet,
        out_parquet,
        deployment,
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
            parsed = parse_list(raw, settings.stop_words, settings.max_words, markers)
            attributes, failure = parsed.attributes, parsed.failure
        out.append(
            {
                "key": row["key"],
                "web_caption": row["web_caption"],
                "vlm_caption": row["vlm_caption"],
                "raw_answer": raw,
                "attributes": attributes,
                "model": settings.model,
                "engine": answer_of.get(row["key"], {}).get("engine"),
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    _write_output(out_parquet, out, PHASE1_SCHEMA)
    return _count(out, shard_id, "phase1")


def run_phase2(
    phase1_parquet: str | Path,
    out_parquet: str | Path,
    settings: LLMSettings,
    shard_id: str,
    deployment: engine.Deployment | None = None,
) -> dict[str, int]:
    rows = read_parquet_rows(phase1_parquet)
    todo = [row for row in rows if row["failure"] is None and row["attributes"]]
    prompts = [phase2_prompt(settings.prompt, row["attributes"]) for row in todo]
    answer_of, markers = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase2",
        shard_id,
        phase1_parquet,
        out_parquet,
        deployment,
    )
    pid = prompt_id(settings.prompt)
    settings_json = _settings_json(settings)
    out: list[dict[str, Any]] = []
    for row in rows:
        phase1 = list(row["attributes"] or [])
        answer = answer_of.get(row["key"], {})
        raw = answer.get("answer")
        phase2: list[str] = []
        phase2_failure: str | None = None
        failure = row["failure"] if row["failure"] is not None else None
        if failure is None and row["key"] in answer_of:
            # A phase-2 answer that fails or does not parse costs only the new elements:
            # the phase-1 attributes still stand, so the sample is kept and the phase-2
            # failure counted on its own.
            if raw is None:
                phase2_failure = answer.get("failure") or "generation_error"
            else:
                parsed = parse_list(raw, settings.stop_words, settings.max_words, markers)
                phase2, phase2_failure = parsed.attributes, parsed.failure
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
                "phase2_failure": phase2_failure,
                "model": settings.model,
                "engine": answer.get("engine"),
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    _write_output(out_parquet, out, PHASE2_SCHEMA)
    counts = _count(out, shard_id, "phase2")
    counts["phase2_failed"] = sum(1 for r in out if r["phase2_failure"] is not None)
    if counts["phase2_failed"]:
        reasons: dict[str, int] = {}
        for r in out:
            if r["phase2_failure"] is not None:
                reason = r["phase2_failure"].split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        log.warning(
            "phase2 shard %s: %d kept samples have phase-1 attributes only: %s",
            shard_id,
            counts["phase2_failed"],
            reasons,
        )
    return counts


def _write_output(out_parquet: str | Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    # Model-parallel ranks all compute the rows; rank 0 writes them.
    if distributed.rank_from_env().is_main:
        write_rows_parquet(out_parquet, rows, schema)
        progress_path(out_parquet).unlink(missing_ok=True)


def _settings_json(settings: LLMSettings) -> str:
    """The settings a row was made with (the prompt is identified by prompt_id)."""
    return json.dumps(settings.recorded(), sort_keys=True)


def _count(rows: list[dict[str, Any]], shard_id: str, phase: str) -> dict[str, int]:
    failed = sum(1 for r in rows if r["failure"] is not None)
    counts = {"in": len(rows), "ok": len(rows) - failed, "failed": failed}
    log.info("%s shard %s: %s", phase, shard_id, counts)
    return counts


@dataclass(frozen=True)
class PhaseJob:
    """One attribute phase on one shard, as a file the launched processes read."""

    phase: str  # "phase1" or "phase2"
    input_path: str
    out_path: str
    settings: LLMSettings
    shard_id: str
    deployment: engine.Deployment | None = None

    def run(self) -> dict[str, int]:
        run_phase = run_phase1 if self.phase == "phase1" else run_phase2
        try:
            return run_phase(
                self.input_path, self.out_path, self.settings, self.shard_id, self.deployment
            )
        finally:
            if meta_llama.is_meta_checkpoint(self.settings.model):
                meta_llama.leave_model_parallel()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "settings": asdict(self.settings)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhaseJob:
        settings = dict(data["settings"])
        settings["stop_words"] = tuple(settings["stop_words"])
        deployment = data.get("deployment")
        return cls(
            **{
                **data,
                "settings": LLMSettings(**settings),
                "deployment": engine.Deployment(**deployment) if deployment else None,
            }
        )


def launch(job: PhaseJob, launcher: str | None, log_file: IO[str]) -> None:
    """Run ``job`` here, or on one process per shard of a model-parallel Meta checkpoint.

    ``launcher`` is the rule's ``mpi`` resource from the profile (e.g. ``srun``); without
    one, an N-shard checkpoint is started with ``torchrun --standalone
    --nproc-per-node=N`` inside this job.
    """
    model = job.settings.model
    parallel = meta_llama.model_parallel_size(model) if meta_llama.is_meta_checkpoint(model) else 1
    if parallel == 1:
        job.run()
        return
    spec = Path(job.out_path).parent / f".{Path(job.out_path).name}.job.json"
    distributed.launch_module(
        launcher or f"torchrun --standalone --nproc-per-node={parallel}",
        "vlmflow.stages.attributes",
        spec,
        job.to_json(),
        log_file,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m vlmflow.stages.attributes JOB.json``."""
    args = sys.argv[1:] if argv is None else argv
    distributed.log_as_rank()
    try:
        PhaseJob.from_json(read_json(args[0])).run()
    finally:
        distributed.finish()


if __name__ == "__main__":
    main()


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
