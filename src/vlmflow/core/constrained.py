"""Constrained answers: an attribute phase's answer as a JSON array of short strings.

With ``attributes.phaseN.format: json`` every answer is constrained, token by token, to
the JSON schema of ``ListShape.schema``: an array of at most ``max_items`` strings of 1 to
``max_item_chars`` characters, with no quote, backslash or control character in them
(labels never need an escape, so an answer is as long as it looks). Phase 1 asks for at
least one item; phase 2 may answer ``[]`` (nothing new to add).

Both backends constrain with xgrammar, compiled the same way, so their greedy answers
agree: the ``hf`` backend through ``JsonListProcessor``, a transformers logits processor
over one xgrammar matcher per row; the ``vllm`` backend through the request's
``structured_outputs`` and the engine's ``structured_outputs_config`` (benchmarks/
generation.py measures the cost against free text; benchmarks/README.md has the figure
and why xgrammar). The answer is still parsed by vlmflow.core.attribute_text.parse_list, which
reads a JSON array first; an array cut off by max_new_tokens is counted as ``truncated``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("text", "json")
# The settings keys that exist for json mode only: a text-mode phase leaves them out of
# its params and its recorded settings, so runs from before json mode keep theirs.
JSON_KEYS = ("format", "max_items", "max_item_chars")
# Compact JSON (vLLM: structured_outputs_config.disable_any_whitespace): free whitespace
# lets a model pad an answer with newlines up to max_new_tokens.
SEPARATORS = (",", ":")
# xgrammar serves both backends: vLLM's default choice, and the one with a transformers
# integration (benchmarks/README.md has the measurements behind the choice).
LIBRARY = "xgrammar"
# Characters an item may not hold: JSON's quote, backslash and control characters.
_ITEM_CHARS = '[^"\\\\\\u0000-\\u001f\\u007f]'


@dataclass(frozen=True)
class ListShape:
    """The bounds of a constrained answer."""

    min_items: int
    max_items: int
    max_item_chars: int

    def schema(self) -> dict[str, Any]:
        item = {"type": "string", "pattern": f"^{_ITEM_CHARS}{{1,{self.max_item_chars}}}$"}
        schema: dict[str, Any] = {"type": "array", "items": item, "maxItems": self.max_items}
        if self.min_items:
            schema["minItems"] = self.min_items
        return schema

    def max_tokens(self) -> int:
        """Tokens of the longest answer the schema allows, in ASCII: a token carries at
        least one character; each item adds its quotes, a comma and (xgrammar 0.2.8) a
        space after it."""
        return 2 + self.max_items * (self.max_item_chars + 4)


def phase_shape(phase: str, max_items: int, max_item_chars: int) -> ListShape:
    """Phase 1 names at least one thing; phase 2 may have nothing new to add."""
    return ListShape(1 if phase == "phase1" else 0, max_items, max_item_chars)


def engine_options() -> dict[str, Any]:
    """vLLM engine arguments that make its structured outputs those of ``hf_processor``."""
    return {"structured_outputs_config": {"backend": LIBRARY, "disable_any_whitespace": True}}


def request_fields(shape: ListShape) -> dict[str, Any]:
    """What a vLLM request's sampling carries to be constrained to ``shape``."""
    return {"structured_outputs": {"json": shape.schema()}}


def stop_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None) -> list[int]:
    """The ids that end a constrained answer: the tokenizer's EOS and the model's own stop
    ids (generation_config.json), as vLLM stops on both."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@dataclass(frozen=True)
class HFConstraint:
    """A phase's grammar, compiled once per job against the model's vocabulary, and the
    ids that end an answer."""

    compiled: Any  # xgrammar.CompiledGrammar
    stops: list[int]

    def generate_kwargs(self) -> dict[str, Any]:
        """``generate`` arguments for one call: a fresh processor (its matchers follow
        one batch) and the stop ids the grammar ends on."""
        from transformers import LogitsProcessorList

        processor = JsonListProcessor(self.compiled, self.stops)
        return {"logits_processor": LogitsProcessorList([processor]), "eos_token_id": self.stops}


def hf_constraint(tokenizer: Any, model: Any, shape: ListShape) -> HFConstraint:
    """``shape``'s grammar for a transformers ``model``: over its output rows (which may
    exceed the tokenizer's vocabulary), ending on its generation_config's stop ids."""
    import xgrammar

    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(shape.schema()), any_whitespace=False, separators=SEPARATORS
    )
    return HFConstraint(compiled, stop_ids(tokenizer, model.generation_config.eos_token_id))


class JsonListProcessor:
    """A transformers logits processor: each row's scores are masked to the tokens its
    grammar accepts next. A row whose grammar has ended keeps the mask of its end (stop
    ids only), so it can never sample a token the grammar would reject."""

    def __init__(self, compiled: Any, stops: list[int]) -> None:
        self.compiled = compiled
        self.stops = stops
        self.matchers: list[Any] = []
        self.bitmask: Any = None
        self.batch: Any = None  # xgrammar.BatchGrammarMatcher
        self.started = False

    def _live(self) -> list[int]:
        return [row for row, matcher in enumerate(self.matchers) if not matcher.is_terminated()]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import xgrammar

        if not self.matchers:
            rows = input_ids.shape[0]
            self.matchers = [
                xgrammar.GrammarMatcher(self.compiled, override_stop_tokens=self.stops)
                for _ in range(rows)
            ]
            vocab = self.compiled.tokenizer_info.vocab_size
            self.bitmask = xgrammar.allocate_token_bitmask(rows, vocab)
            self.batch = xgrammar.BatchGrammarMatcher()
        if self.started:
            live = self._live()
            tokens = input_ids[:, -1].tolist()
            accepted = xgrammar.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[row] for row in live], [tokens[row] for row in live]
            )
            for row, ok in zip(live, accepted, strict=True):
                if not ok:
                    raise RuntimeError(f"row {row}: the JSON grammar rejects token {tokens[row]}")
        self.started = True
        live = self._live()
        if live:
            matchers = [self.matchers[row] for row in live]
            self.batch.batch_fill_next_token_bitmask(matchers, self.bitmask, live)
        if scores.device.type in ("cpu", "cuda"):
            xgrammar.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
            return scores
        masked = scores.cpu()
        xgrammar.apply_token_bitmask_inplace(masked, self.bitmask)
        return masked.to(scores.device)


def check_answer_formats(attributes: dict[str, Any]) -> list[str]:
    """A json-mode phase whose max_new_tokens cannot hold its longest allowed answer: such
    answers are cut and counted as truncated."""
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
