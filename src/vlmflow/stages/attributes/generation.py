"""Answers of an instruct LLM for the attribute prompts: on transformers (batches by
length, the prompts' shared prefix computed once, json mode's grammar), on a
Meta-format checkpoint (vlmflow.families.meta_llama) or on the vLLM engine."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmflow.core import constrained, engine
from vlmflow.core.attribute_text import (
    phase1_prompt,
    phase2_prompt,
)
from vlmflow.core.io import stable_seed
from vlmflow.core.models import device, hf_engine, pretrained, torch_dtype
from vlmflow.core.progress import (
    BATCH_ERRORS,
)
from vlmflow.families import meta_llama
from vlmflow.stages.attributes.settings import LLMSettings

log = logging.getLogger(__name__)


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


def make_generator(
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
        return vllm_generator(settings, prompts, keys, seed, stack, deployment, shape)
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


def vllm_generator(
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
