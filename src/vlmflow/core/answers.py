"""An instruct model's answer, unwrapped: what surrounds or encodes the list it gives.

Real instruct models rarely answer with the bare list a prompt asks for. Around it or
instead of it they write special tokens and role headers left in the text (``<|eot_id|>``,
``<|im_end|>``, ``</s>``, an ``assistant`` header, ``ASSISTANT:``), a reasoning block
(``<think>...</think>``), a fenced code block, or the list as JSON (an array, an object
holding arrays, a Python-style list in single quotes). :func:`unwrap` takes those away and
says what is left: the list's items when the answer encoded them (JSON), or the free text
to split into items; or why no list can be read with confidence (``truncated``: a
reasoning block, code fence or array that never closes, as when ``max_new_tokens`` cut
the answer; ``unparsed``: text that looks like JSON and is not).

Special tokens are those of the model's own tokenizer (``special_tokens``), plus the
chat markers of the common families (``<|...|>``, ``<s>``, ``</s>``, ``[INST]``,
``<start_of_turn>``...), so that an answer is read the same whichever engine decoded it.
An end-of-turn token ends the answer: what follows is a turn the model went on to write.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Unwrapped", "unwrap"]

# Chat markers of the common model families, beside the tokenizer's own list.
_CHAT_MARKER = r"<\|[^|<>\s]{1,40}\|>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>"
# A marker that ends the model's turn (Llama 3, ChatML, Gemma, Mistral/Llama 2, Phi, GPT).
_END_OF_TURN = re.compile(
    r"eot_id|im_end|end_of_turn|endoftext|end_of_text|^</s>$|^<\|end\|>$|^<eos>$|\|eos\|",
    re.IGNORECASE,
)
_ROLES = r"(?:assistant|model|gpt|bot|ai|answer|response)"
# A role header line at the start ("assistant", "ASSISTANT:", "### Response:").
_LEADING_ROLE = re.compile(
    r"^\s*(?:#{1,4}\s*)?" + _ROLES + r"\s*(?::|\n|$)[ \t]*\n?", re.IGNORECASE
)
# A later line that opens another turn: the model went on talking to itself.
_NEXT_TURN = re.compile(
    r"^\s*(?:#{1,4}\s*)?(?:user|human|system|instruction)\s*:?\s*$|^\s*(?:USER|Human):",
    re.MULTILINE,
)
_REASONING = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.IGNORECASE | re.DOTALL)
_REASONING_OPEN = re.compile(r"<(?:think|thinking|reasoning)>", re.IGNORECASE)
_REASONING_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_FENCE_OPEN = re.compile(r"```[\w+-]*[ \t]*\n?")
# The first line that starts a JSON value or a Python list, after at most a short preamble.
_JSON_START = re.compile(r"^[ \t]*[\[{]", re.MULTILINE)
_PREAMBLE_CHARS = 200
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"|\'((?:[^\'\\\n]|\\.)*)\'|\u201c([^\u201d\n]*)\u201d')
# Keys whose value names the item when a JSON list holds objects.
_NAME_KEYS = ("name", "label", "object", "attribute", "item", "text", "value")


@dataclass(frozen=True)
class Unwrapped:
    """What an answer gives: ``items`` when it encoded a list (JSON or a Python literal),
    else ``text`` to split; ``failure`` when it gives no list that can be trusted."""

    text: str
    items: list[str] | None = None
    failure: str | None = None


def unwrap(answer: str, special_tokens: Sequence[str] = ()) -> Unwrapped:
    """The list an answer gives, without its wrapping (see the module docstring)."""
    text = _cut_turn(answer, special_tokens)
    text, failure = _drop_reasoning(text)
    if failure is not None:
        return Unwrapped(text, failure=failure)
    text, fence_open = _unfence(text)
    start = _json_start(text)
    if start is None:
        if fence_open:  # an unclosed code fence without a list in it: cut off
            return Unwrapped(text, failure="truncated")
        return Unwrapped(text)
    return _decode(text, start)


def _cut_turn(answer: str, special_tokens: Sequence[str]) -> str:
    """The answer up to its end-of-turn marker, other markers and role headers removed."""
    own = sorted({token for token in special_tokens if token.strip()}, key=len, reverse=True)
    pattern = "|".join([*(re.escape(token) for token in own), _CHAT_MARKER])
    pieces: list[str] = []
    position = 0
    for match in re.finditer(pattern, answer):
        pieces.append(answer[position : match.start()])
        position = match.end()
        if _END_OF_TURN.search(match.group()) and "".join(pieces).strip():
            break
        pieces.append("\n")
    else:
        pieces.append(answer[position:])
    text = "".join(pieces).strip()
    while True:  # a role header may follow another ("assistant\n\nAssistant:")
        stripped = _LEADING_ROLE.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    turn = _NEXT_TURN.search(text)
    return text[: turn.start()].strip() if turn else text


def _drop_reasoning(text: str) -> tuple[str, str | None]:
    """Text without reasoning blocks; ``truncated`` when one never closes."""
    text = _REASONING.sub("\n", text)
    closes = list(_REASONING_CLOSE.finditer(text))
    if closes:  # the template opened the block in the prompt: the answer follows it
        text = text[closes[-1].end() :]
    if _REASONING_OPEN.search(text):
        return text, "truncated"
    return text.strip(), None


def _unfence(text: str) -> tuple[str, bool]:
    """The first fenced block's content if there is one; whether a fence never closes."""
    block = _FENCE.search(text)
    if block is not None:
        return block.group(1).strip(), False
    opened = _FENCE_OPEN.search(text)
    if opened is not None:
        return text[opened.end() :].strip(), True
    return text, False


def _json_start(text: str) -> int | None:
    match = _JSON_START.search(text)
    if match is None or len(text[: match.start()].strip()) > _PREAMBLE_CHARS:
        return None
    return match.end() - 1


def _decode(text: str, start: int) -> Unwrapped:
    """The items of the JSON value (or Python list) at ``start``."""
    body = text[start:]
    try:
        value, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        value = _python_literal(body)
    if value is not None:
        items = _json_items(value)
        if items is None:  # an object without a list, a bare string or number
            return Unwrapped(text, failure="unparsed")
        return Unwrapped(text, items=items)
    end = _closing(body)
    if end is None:
        return Unwrapped(text, failure="truncated")
    inner = body[1:end]
    quoted = [match.group(match.lastindex or 0) for match in _QUOTED.finditer(inner)]
    if quoted:  # ["dog", "cat",] with stray commas, smart quotes: the quoted strings
        return Unwrapped(text, items=[item for item in quoted if item.strip()])
    if body[0] == "[":  # [dog, cat, tree]: a list written without quotes
        return Unwrapped(inner + "\n" + body[end + 1 :])
    return Unwrapped(text, failure="unparsed")


def _python_literal(body: str) -> Any:
    end = _closing(body)
    if end is None:
        return None
    try:
        return ast.literal_eval(body[: end + 1])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _closing(body: str) -> int | None:
    """The index of the bracket that closes ``body[0]``, quotes respected; None if none."""
    depth, quote, escaped = 0, "", False
    for index, char in enumerate(body):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote or (quote == "\u201c" and char == "\u201d"):
                quote = ""
        elif char in "\"'\u201c" and not (char == "'" and index and body[index - 1].isalpha()):
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index
    return None


def _json_items(value: Any) -> list[str] | None:
    """The strings of a decoded list, or of every list an object holds; None if none."""
    if isinstance(value, dict):
        lists = _lists_in(value)
        if not lists:
            return None
        return [item for member in lists for item in _element(member)]
    if isinstance(value, (list, tuple)):
        return [item for member in value for item in _element(member)]
    return None


def _lists_in(value: dict[Any, Any]) -> list[list[Any]]:
    """The lists an object holds, at any depth, in order."""
    found: list[list[Any]] = []
    for member in value.values():
        if isinstance(member, list):
            found.append(member)
        elif isinstance(member, dict):
            found.extend(_lists_in(member))
    return found


def _element(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [item for member in value for item in _element(member)]
    if isinstance(value, dict):
        for key in _NAME_KEYS:
            if isinstance(value.get(key), str):
                return [value[key]]
        return [v for v in value.values() if isinstance(v, str)]
    return []
