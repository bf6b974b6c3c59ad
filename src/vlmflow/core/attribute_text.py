"""Pure text handling for the two attribute-extraction phases.

Nothing here loads a model.  The ``attributes`` stage feeds an instruct LLM with the
prompts built here and turns its free-form answers into clean label lists:

* :func:`clean_vlm_caption` trims a VLM caption to the sentences that describe content;
* :func:`phase1_prompt` / :func:`phase2_prompt` fill the prompt templates;
* :func:`parse_list` turns a messy LLM answer into a list of short phrases;
* :func:`merge_phases` merges the phase-1 and phase-2 lists into the final labels,
  in an order that depends only on the seed (never on Python's salted ``hash()``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from vlmflow.core.answers import unwrap

__all__ = [
    "MergedAttribute",
    "ParseResult",
    "clean_vlm_caption",
    "merge_phases",
    "parse_list",
    "phase1_prompt",
    "phase2_prompt",
    "singularize",
]


@dataclass(frozen=True)
class ParseResult:
    """The usable items of one LLM answer.

    ``attributes`` are clean, deduplicated and in answer order.  ``failure`` is ``None``
    when the answer gave at least one item, else why not: ``"empty_answer"`` (blank),
    ``"refused"``, ``"truncated"``, ``"unparsed"`` (see :func:`parse_list`) or
    ``"no_items"`` (nothing survived cleaning).
    """

    attributes: list[str]
    failure: str | None


@dataclass(frozen=True)
class MergedAttribute:
    """One final attribute and where it came from: ``"phase1"``, ``"phase2"`` or ``"both"``."""

    text: str
    source: str


# ---------------------------------------------------------------------------
# VLM caption cleaning
# ---------------------------------------------------------------------------

_CAPTION_OPENER = re.compile(
    r"^\s*(?:"
    r"(?:in|within)\s+(?:this|the)\s+(?:image|picture|photo|photograph|scene)\s*,?"
    r"|(?:this|the)\s+(?:image|picture|photo|photograph|scene)\s+"
    r"(?:shows|depicts|features|displays|presents|captures|contains|is\s+of)"
    r"|this\s+is"
    r"|here\s+(?:we\s+see|is|we\s+have)"
    r"|we\s+(?:can\s+)?see"
    r")\s*[:,]?\s*",
)

# Sentences about the feel of the picture rather than its content.
_MOOD_WORDS = re.compile(
    r"\b(?:atmospheres?|atmospheric|lighting|lit|illuminat\w*|mood\w*|ambi(?:ance|ence|ent)"
    r"|vibes?|feel(?:s|ing)?|evok\w+|sense\s+of|overall|tranquil\w*|serene|serenity|cozy"
    r"|cosy|peaceful|inviting|warm\s+glow|(?:sun|day)light|natural\s+light|soft\s+light)\b"
)
_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were)\s+(?:no|not)|there\s+(?:is|are)\s+no|isn't|aren't|wasn't"
    r"|weren't|without\s+any|no\s+(?:visible|other|people|one)|not\s+visible|nor)\b"
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def clean_vlm_caption(text: str) -> str:
    """Return the content sentences of a VLM caption, lower-cased.

    The opening "this is" / "the image shows" / "in this image," phrase is removed, and
    sentences about atmosphere, lighting or mood, or that state what is *not* there,
    are dropped.  The remaining sentences are joined with single spaces.
    """
    lowered = " ".join(text.lower().split())
    lowered = _CAPTION_OPENER.sub("", lowered, count=1)
    kept: list[str] = []
    for sentence in _SENTENCE_SPLIT.split(lowered):
        sentence = sentence.strip()
        if not sentence or _MOOD_WORDS.search(sentence) or _NEGATION.search(sentence):
            continue
        kept.append(sentence)
    return " ".join(kept)


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders in one pass.

    Unlike ``str.format`` this never interprets other braces, neither in the template
    nor in the values, so captions containing ``{`` or ``}`` are safe, and a value that
    happens to contain ``{vlm_caption}`` is not substituted a second time.
    """
    missing = [name for name in values if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"prompt template lacks placeholder(s): {', '.join(missing)}")
    pattern = re.compile(r"\{(" + "|".join(re.escape(name) for name in values) + r")\}")
    return pattern.sub(lambda match: values[match.group(1)], template)


def phase1_prompt(template: str, web_caption: str, vlm_caption: str) -> str:
    """Fill the phase-1 template's ``{web_caption}`` and ``{vlm_caption}`` placeholders."""
    return _fill(template, {"web_caption": web_caption.strip(), "vlm_caption": vlm_caption.strip()})


def phase2_prompt(template: str, phase1_attributes: list[str]) -> str:
    """Fill the phase-2 template's ``{attributes}`` with a numbered list ``1. x\\n2. y``."""
    numbered = "\n".join(f"{i}. {item}" for i, item in enumerate(phase1_attributes, start=1))
    return _fill(template, {"attributes": numbered})


# ---------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------

_PREAMBLE_START = re.compile(
    r"^(?:here|sure|certainly|below|the\s+following|of\s+course|okay|ok)\b", re.IGNORECASE
)
# A trailing note or explanation: everything from here to the end is dropped.
_NOTE_LINE = re.compile(
    r"^(?:notes?|explanations?|i\s+hope|let\s+me\s+know|please\s+note|hope\s+this)\b",
    re.IGNORECASE,
)
_INLINE_NOTE = re.compile(r"(?:\bnotes?|\bexplanations?)\s*:", re.IGNORECASE)
# "1. x", "1) x", "(1) x" (but not "3.5 inch"), and bullets: - * + and the Unicode ones.
_BULLETS = r"[-*+\u2022\u00b7\u2013\u2014\u25aa\u25cf\u25e6]"
_LIST_MARKER = re.compile(r"^(?:\(\d{1,3}\)|\d{1,3}\s*(?:\.(?!\d)|\))|" + _BULLETS + r")\s*")
# "1. dog 2. cat 3. tree" or "• dog • cat" on one line.
_INLINE_SPLIT = re.compile(r"\s+(?=\(?\d{1,3}[.)]\s)|\s+(?=[\u2022\u25cf\u25aa\u25e6]\s)")
_DEFINITION_SPLIT = re.compile(r"\s*:\s+|\s+[-\u2013\u2014]\s+")
_PARENTHESES = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_EDGE_PUNCTUATION = ".,;:!?" + _QUOTES
_LEADING_FILLER = re.compile(r"^(?:(?:and|or|a|an|the)\s+)+")
# Letters, digits, whitespace and the punctuation real phrases use ("t-shirt", "man's").
_ALLOWED_CHAR = re.compile(r"[^\W_]|[\s\-'\u2019&/.]")
_JUNK_ITEMS = frozenset(
    {"etc", "and so on", "none", "n/a", "nothing", "no", "yes", "list"}
    # A markdown table's header row: | object | attribute |
    | {"object", "objects", "attribute", "attributes", "item", "items"}
)
# An answer that declines the task: a parse failure of its own ("refused"), raw kept.
_REFUSAL = re.compile(
    r"^\s*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry\b|i\s+(?:cannot|can't|can\s+not|am\s+unable"
    r"|'m\s+unable|won't)|i'm\s+unable|as\s+an\s+ai\b|unfortunately,?\s+i\b)",
    re.IGNORECASE,
)
# A sentence rather than a label: labels are noun phrases, without these verbs.
_SENTENCE_VERB = re.compile(
    r"\b(?:is|are|was|were|be|been|can|could|would|should|appears?|seems?|describes?"
    r"|shows?|includes?|visible)\b"
)
# Emoji and other pictographs, their variation selectors and joiners: decoration only.
_DECORATION_CATEGORIES = frozenset({"So", "Sk", "Cf"})
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f]")
_REPLACEMENT_CHAR = "\ufffd"


def _strip_markdown(line: str) -> str:
    line = line.replace("**", "").replace("__", "")
    return line.strip()


def _drop_trailing_notes(lines: list[str]) -> list[str]:
    kept: list[str] = []
    for line in lines:
        bare = _LIST_MARKER.sub("", line).lstrip("*_ ")
        if _NOTE_LINE.match(bare):
            break
        inline = _INLINE_NOTE.search(line)
        if inline:
            kept.append(line[: inline.start()])
            break
        kept.append(line)
    return kept


def _drop_preamble(lines: list[str]) -> list[str]:
    """Remove a leading "Here is the list:" style line (keeping any items after its colon)."""
    if not lines:
        return lines
    first = lines[0].strip()
    if first.endswith(":"):
        return lines[1:]
    if _PREAMBLE_START.match(first):
        _, colon, tail = first.partition(":")
        return ([tail] if colon and tail.strip() else []) + lines[1:]
    return lines


def _strip_decoration(text: str) -> str:
    text = _VARIATION_SELECTORS.sub("", unicodedata.normalize("NFC", text))
    # U+FFFD (a decoding error) is kept: an item containing it is rejected as broken.
    return "".join(
        " "
        if unicodedata.category(ch) in _DECORATION_CATEGORIES and ch != _REPLACEMENT_CHAR
        else ch
        for ch in text
    )


def _is_commentary(line: str) -> bool:
    """An unmarked line of three or more words ending like a sentence."""
    unmarked = not _LIST_MARKER.match(line)
    return unmarked and line.rstrip().endswith((".", "!", "?")) and len(line.split()) >= 3


def _raw_items(answer: str) -> list[str]:
    """Split an answer into candidate items, before per-item cleaning."""
    lines = [_strip_markdown(_strip_decoration(line)) for line in answer.splitlines()]
    lines = [line for line in lines if line]
    lines = _drop_preamble(lines)
    lines = _drop_trailing_notes(lines)
    # In a numbered or bulleted answer, an unmarked line ending like a sentence is
    # commentary ("These items describe the scene."), not an item.
    listed = any(_LIST_MARKER.match(line) for line in lines)
    items: list[str] = []
    for line in lines:
        if line.endswith(":"):  # a section heading such as "Objects:"
            continue
        if listed and _is_commentary(line):
            continue
        for part in _INLINE_SPLIT.split(line):
            part = part.strip()
            marked = bool(_LIST_MARKER.match(part))
            part = _LIST_MARKER.sub("", part)
            # Parenthesised remarks go; an unclosed "(" drops the rest of the item.
            part = _PARENTHESES.sub(" ", part).split("(")[0].replace(")", " ").strip()
            if marked:
                # "Dog: a brown dog" / "dog - the main subject": keep the term.
                part = _DEFINITION_SPLIT.split(part, maxsplit=1)[0]
            elif ":" in part:
                # "Objects: dog, cat": keep what follows the label.
                part = part.split(":", 1)[1]
            items.extend(re.split(r"[,;|]|\s+/\s+", part))
    return items


def _clean_item(item: str) -> str:
    item = item.replace("*", " ").replace("_", " ").lower()
    item = " ".join(item.split())
    item = item.strip(_EDGE_PUNCTUATION + " ")
    item = _LEADING_FILLER.sub("", item)
    return item.strip(_EDGE_PUNCTUATION + " ")


def _usable(item: str, max_words: int, stop_patterns: Sequence[re.Pattern[str]]) -> bool:
    if not item or item in _JUNK_ITEMS:
        return False
    if _REPLACEMENT_CHAR in item or not item.isprintable():
        return False
    if sum(ch.isalpha() for ch in item) < 2:  # pure numbers/punctuation, stray letters
        return False
    if any(not _ALLOWED_CHAR.match(ch) for ch in item):  # symbol noise such as "#@%~"
        return False
    if len(item.split()) > max_words or _SENTENCE_VERB.search(item):
        return False
    return not any(pattern.search(item) for pattern in stop_patterns)


def parse_list(
    answer: str,
    stop_words: Sequence[str] = (),
    max_words: int = 6,
    special_tokens: Sequence[str] = (),
) -> ParseResult:
    """Parse a free-form LLM answer into a clean list of short phrases.

    The answer is first unwrapped (vlmflow.core.answers): special tokens (the tokenizer's own,
    ``special_tokens``, and the common chat markers), role headers, reasoning blocks and
    code fences go, and a JSON array or object, or a Python-style list, gives its strings.
    Free text may be numbered (``1. x``, ``1) x``, ``(1) x``), bulleted (``- x``, ``* x``,
    ``• x``), comma-, semicolon-, ``|``- or newline-separated, or mixed.  A leading "Here
    is the list:" line, trailing notes, parenthesised remarks and markdown emphasis are
    removed; items are lower-cased and stripped of quotes, leading articles and edge
    punctuation.  Items that are too long (more than ``max_words`` words), empty, without
    letters, containing non-printable characters or symbol noise, or containing a stop
    word (whole-word match) are dropped, and duplicates keep their first occurrence.
    An answer that gives no list with confidence is a failure, never a shorter list:
    ``empty_answer``, ``refused``, ``truncated`` (cut off inside a reasoning block, code
    fence or JSON array), ``unparsed`` (JSON that is not a list) or ``no_items``.
    """
    if not answer or not answer.strip():
        return ParseResult(attributes=[], failure="empty_answer")
    unwrapped = unwrap(answer, special_tokens)
    if unwrapped.failure is not None:
        return ParseResult(attributes=[], failure=unwrapped.failure)
    if not unwrapped.text.strip() and unwrapped.items is None:
        return ParseResult(attributes=[], failure="empty_answer")
    if _REFUSAL.match(unwrapped.text) and unwrapped.items is None:
        return ParseResult(attributes=[], failure="refused")
    if unwrapped.items is not None:
        raw_items = [piece for item in unwrapped.items for piece in re.split(r"[,;|]", item)]
    else:
        raw_items = _raw_items(unwrapped.text)
    stop_patterns = [
        re.compile(r"(?<!\w)" + re.escape(" ".join(word.lower().split())) + r"(?!\w)")
        for word in stop_words
        if word.strip()
    ]
    seen: set[str] = set()
    attributes: list[str] = []
    for raw in raw_items:
        item = _clean_item(raw)
        if item in seen or not _usable(item, max_words, stop_patterns):
            continue
        seen.add(item)
        attributes.append(item)
    return ParseResult(attributes=attributes, failure=None if attributes else "no_items")


# ---------------------------------------------------------------------------
# Singular forms
# ---------------------------------------------------------------------------

_IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
}
# Plurals whose "-ves" really comes from "-f"/"-fe" (other "-ves" words just drop "s").
_VES_PLURALS = {
    "leaves": "leaf",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "loaves": "loaf",
    "scarves": "scarf",
    "thieves": "thief",
    "hooves": "hoof",
    "sheaves": "sheaf",
}
# Words ending in "s" that must stay as they are.
_INVARIANT = frozenset(
    {
        "news",
        "series",
        "species",
        "jeans",
        "pants",
        "shorts",
        "trousers",
        "scissors",
        "glasses",
        "sunglasses",
        "eyeglasses",
        "clothes",
        "goggles",
        "headphones",
        "earphones",
        "pliers",
        "binoculars",
        "overalls",
        "leggings",
        "tights",
        "pajamas",
        "pyjamas",
        "lens",
        "canvas",
        "atlas",
        "christmas",
        "chess",
        "physics",
        "gymnastics",
        "athletics",
    }
)
# "-ies" / "-oes" words formed from "-ie" / "-oe" singulars: just drop the "s".
_IE_OE_WORDS = frozenset(
    {
        "movies",
        "cookies",
        "zombies",
        "selfies",
        "brownies",
        "hoodies",
        "beanies",
        "goalies",
        "collies",
        "magpies",
        "smoothies",
        "calories",
        "prairies",
        "pies",
        "ties",
        "toes",
        "tiptoes",
        "hoes",
        "canoes",
        "oboes",
    }
)


def _singular_word(word: str) -> str:
    lower = word.lower()
    if lower in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[lower]
    if lower in _INVARIANT or len(lower) <= 3 or not lower.endswith("s"):
        return word
    if lower.endswith(("ss", "us", "is")):  # glass, bus, grass, cactus, tennis
        return word
    if lower in _VES_PLURALS:
        return _VES_PLURALS[lower]
    if lower in _IE_OE_WORDS or lower.endswith("shoes"):
        return word[:-1]
    if lower.endswith("lves"):  # wolves, shelves, halves, calves
        return word[:-3] + "f"
    if lower.endswith("ies"):  # puppies, berries
        return word[:-3] + "y"
    if lower.endswith(("sses", "xes", "ches", "shes", "zzes", "oes")):
        return word[:-2]  # dresses, boxes, benches, dishes, tomatoes
    if lower.endswith("uses") and not lower.endswith("ouses"):  # buses, viruses
        return word[:-2]
    return word[:-1]  # cars, horses, houses, gloves


def singularize(word: str) -> str:
    """Return ``word`` with its last word in the singular (small rule-based singulariser).

    Handles the irregulars men, women, children, people, feet, teeth, mice and geese;
    ``-ies`` -> ``-y``; ``-ves`` -> ``-f``/``-fe`` for the usual words (leaves, knives,
    wolves); ``-sses``/``-xes``/``-ches``/``-shes`` lose ``es``; other ``-s`` lose ``s``.
    Words ending in ``-ss``/``-us``/``-is`` (glass, bus, tennis), words of three letters
    or fewer and pluralia tantum such as "jeans" or "glasses" are left unchanged.  Given
    a phrase, only its last word is changed ("red cars" -> "red car").
    """
    head, sep, last = word.rstrip().rpartition(" ")
    if not last:
        return word
    return head + sep + _singular_word(last)


# ---------------------------------------------------------------------------
# Merging the two phases
# ---------------------------------------------------------------------------

_HUMAN_PLURALS = {"men": "man", "women": "woman", "children": "child", "people": "person"}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _heavily_overlaps(short: str, long: str) -> bool:
    short_words, long_words = set(short.split()), set(long.split())
    common = len(short_words & long_words)
    if common >= 3:
        return True
    return common / len(short_words) >= 0.65 and common / len(long_words) >= 0.65


def _map_human_plural(text: str) -> str:
    """Map "young men" to "young man"; left alone after "of" ("group of people")."""
    words = text.split()
    if words[-1] in _HUMAN_PLURALS and not (len(words) > 1 and words[-2] == "of"):
        words[-1] = _HUMAN_PLURALS[words[-1]]
    return " ".join(words)


def _shuffle_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def merge_phases(
    phase1: list[str], phase2: list[str], seed: int, max_phrase_words: int = 4
) -> list[MergedAttribute]:
    """Merge the phase-1 and phase-2 attribute lists into the final labels.

    1. Phase-1 phrases with more than ``max_phrase_words`` words are dropped.
    2. A phase-1 phrase that heavily overlaps a longer phase-1 phrase (at least 3 common
       words, or common words making up at least 65 % of both phrases) is dropped in
       favour of the longer one.
    3. The rest is united with phase 2; "men"/"women"/"children"/"people" as the last
       word become "man"/"woman"/"child"/"person".
    4. A plural ("cars", "red boxes", "feet") is dropped when its singular is present.
    5. Duplicates are merged; ``source`` says which phase(s) the text came from.

    The result is sorted by number of words, then by a key hashed (SHA-256) from
    ``(seed, text)``: the same inputs and seed always give the same order.
    """
    first: list[str] = []
    for text in map(_normalise, phase1):
        if text and len(text.split()) <= max_phrase_words and text not in first:
            first.append(text)
    first = [
        text
        for text in first
        if not any(
            len(other.split()) > len(text.split()) and _heavily_overlaps(text, other)
            for other in first
        )
    ]
    second = [text for text in map(_normalise, phase2) if text]

    sources: dict[str, set[str]] = {}
    for name, texts in (("phase1", first), ("phase2", second)):
        for text in texts:
            sources.setdefault(_map_human_plural(text), set()).add(name)

    merged: list[MergedAttribute] = []
    for text, found_in in sources.items():
        singular = singularize(text)
        if singular != text and singular in sources:
            continue
        source = "both" if len(found_in) == 2 else next(iter(found_in))
        merged.append(MergedAttribute(text=text, source=source))
    merged.sort(key=lambda a: (len(a.text.split()), _shuffle_key(seed, a.text), a.text))
    return merged
