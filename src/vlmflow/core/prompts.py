"""Prompt texts and layouts shared by the stages that must agree on them.

The phase-2 training layout (h5) and the eval prompt (evaluate) must be identical,
otherwise the model is evaluated on a prompt it never saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# LLaVA's ``vicuna_v1`` conversation style, as Cerebras ModelZoo's phase-2 files use it.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

LABEL_SEPARATOR = ", "


def phase2_prefix() -> str:
    """Text before the image patches."""
    return f"{VICUNA_V1_SYSTEM} USER: "


def phase2_prompt(instruction: str) -> str:
    """Text between the image patches and the answer."""
    return f"\n{instruction} ASSISTANT:"


def phase2_answer(labels: list[str]) -> str:
    return " " + LABEL_SEPARATOR.join(labels)


PHASE2_STYLES = ("vicuna_v1", "chat_template")
# Where the image goes in a chat-template prompt; split out before tokenising.
IMAGE_SLOT = "<image>"


@dataclass(frozen=True)
class Phase2Layout:
    """Token ids of a phase-2 sample around the image patches."""

    prefix: list[int]  # before the patches, BOS included
    prompt: list[int]  # between the patches and the answer
    answer: list[int]
    end: int  # closes the answer: EOS (vicuna_v1) or the template's end of turn


def phase2_layout(
    tokenizer: Any, instruction: str, labels: list[str], style: str, bos: int, eos: int
) -> Phase2Layout:
    """``vicuna_v1``: LLaVA's conversation style (Cerebras' phase-2 files);
    ``chat_template``: the language model's own chat template, one user turn (image, then
    the instruction) and the assistant's answer closed by the template's end of turn."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if style == "vicuna_v1":
        return Phase2Layout(
            [bos, *encode(phase2_prefix())],
            encode(phase2_prompt(instruction)),
            encode(phase2_answer(labels)),
            eos,
        )
    if style != "chat_template":
        raise ValueError(f"h5.phase2_style {style!r}: expected one of {', '.join(PHASE2_STYLES)}")
    name = getattr(tokenizer, "name_or_path", "the tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"h5.phase2_style chat_template: {name} has no chat template")
    user = {"role": "user", "content": f"{IMAGE_SLOT}\n{instruction}"}
    opened = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    before, slot, after = opened.partition(IMAGE_SLOT)
    if not slot:
        raise ValueError(f"h5.phase2_style chat_template: {name}'s template drops the user text")
    answer_turn = {"role": "assistant", "content": LABEL_SEPARATOR.join(labels)}
    full = tokenizer.apply_chat_template([user, answer_turn], tokenize=False)
    if not full.startswith(opened):
        raise ValueError(
            f"h5.phase2_style chat_template: {name}'s template renders the conversation "
            "differently once the answer is added; use vicuna_v1"
        )
    answer = encode(full[len(opened) :])
    special = special_token_ids(tokenizer)
    # The answer ends at the template's last special token (end of turn); text the
    # template puts after it (a newline) is not trained on.
    ends = [i for i, token in enumerate(answer) if token in special]
    if not ends:
        raise ValueError(f"h5.phase2_style chat_template: {name}'s template ends no turn")
    return Phase2Layout(encode(before), encode(after), answer[: ends[-1]], answer[ends[-1]])


def special_token_ids(tokenizer: Any) -> set[int]:
    """Named special tokens and every added token marked special (e.g. <|eot_id|>)."""
    return set(tokenizer.all_special_ids) | {
        token_id
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(token, "special", False)
    }


def prompt_id(text: str) -> str:
    """Short content hash recorded with every generated row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_prompt(path: str | Path) -> str:
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: prompt file is empty")
    return text


@dataclass(frozen=True)
class Phase2Turns:
    """A phase-2 sample as a conversation: the user turn (the image as ``<image>``, then
    the instruction) and the assistant's answer."""

    user: str
    answer: str


def phase2_turns(instruction: str, labels: Sequence[str]) -> Phase2Turns:
    """The texts ``phase2_example`` packs, as LLaVA-format turns: ``<image>\\n{instruction}``
    and the labels joined as the answer. LLaVA's ``v1`` (vicuna_v1) template renders them
    as the vicuna_v1 layout, character for character; chat_template renders the same user
    turn and answer with the language model's template."""
    return Phase2Turns(
        user=f"{IMAGE_SLOT}\n{instruction}",
        # vicuna_v1 puts a space before the answer (after "ASSISTANT:"); the turn has none.
        answer=phase2_answer(list(labels)).removeprefix(" "),
    )
