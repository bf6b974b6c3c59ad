"""Tests for the pure text side of the attribute stages (prompts, parsing, merging)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vlmflow.core.attribute_text import (
    MergedAttribute,
    ParseResult,
    clean_vlm_caption,
    merge_phases,
    parse_list,
    phase1_prompt,
    phase2_prompt,
    singularize,
)

PROMPTS = Path(__file__).resolve().parents[1] / "config" / "prompts"
STOP_WORDS = ["background", "atmosphere", "lighting"]


# ---------------------------------------------------------------------------
# parse_list: the messy answers instruct LLMs really give
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(
            "Here is the list:\n1. Red car\n2. blue sky\n3) wooden bench\n(4) green tree",
            ["red car", "blue sky", "wooden bench", "green tree"],
            id="numbered-with-preamble",
        ),
        pytest.param(
            "Sure! Here are the objects:\n\n- dog\n* cat\n• tall tree\n",
            ["dog", "cat", "tall tree"],
            id="bullets-with-preamble",
        ),
        pytest.param(
            "Sure! Here are the objects: dog, cat, and tree.",
            ["dog", "cat", "tree"],
            id="preamble-and-items-on-one-line",
        ),
        pytest.param(
            "red car, blue sky; green grass, white cloud",
            ["red car", "blue sky", "green grass", "white cloud"],
            id="comma-and-semicolon-line",
        ),
        pytest.param(
            "1. red car, blue sky\n2. tree; grass\nbench",
            ["red car", "blue sky", "tree", "grass", "bench"],
            id="mixed-numbered-and-commas",
        ),
        pytest.param("dog\ncat\n\nbench\n", ["dog", "cat", "bench"], id="newline-separated"),
        pytest.param(
            "1. dog 2. cat 3. big red tree", ["dog", "cat", "big red tree"], id="inline-numbers"
        ),
        pytest.param(
            "1. dog\n2. cat\n\nNote: I could not see the rest of the picture.\n"
            "The dog may be a puppy, cat.",
            ["dog", "cat"],
            id="trailing-note-paragraph",
        ),
        pytest.param(
            "1. dog\n2. cat\nExplanation: these are the animals.\nI hope this helps!",
            ["dog", "cat"],
            id="trailing-explanation",
        ),
        pytest.param(
            "- dog\n- cat\nLet me know if you need more.", ["dog", "cat"], id="let-me-know"
        ),
        pytest.param("dog, cat. Note: the cat is small", ["dog", "cat"], id="inline-note"),
        pytest.param(
            "1. **Red car**\n2. __white_fence__\n3. *striped shirt*\n4. **Brown dog**: lying down",
            ["red car", "white fence", "striped shirt", "brown dog"],
            id="markdown",
        ),
        pytest.param(
            "1. Dog (possibly a labrador)\n2. tall tree [left side]\n3. bench (wooden",
            ["dog", "tall tree", "bench"],
            id="parentheses",
        ),
        pytest.param(
            "1. \"Tall tree\".\n2. 'red ball'!\n3. \u201cgreen hat\u201d;",
            ["tall tree", "red ball", "green hat"],
            id="quotes-and-trailing-punctuation",
        ),
        pytest.param("Dog\ndog\nDOG\n  dog  \nDogs\na dog", ["dog", "dogs"], id="case-duplicates"),
        pytest.param(
            "Objects:\n- dog\nAttributes:\n- brown   fur",
            ["dog", "brown fur"],
            id="section-headings",
        ),
        pytest.param(
            "1. 3.5 inch screen\n2. t-shirt\n3. man's hat",
            ["3.5 inch screen", "t-shirt", "man's hat"],
            id="inner-punctuation-kept",
        ),
        pytest.param("1. 42\n2. ...\n3. dog\n4. -\n5. etc.", ["dog"], id="numbers-and-punctuation"),
        pytest.param(
            "Objects: dog, cat\nAttributes: brown, fluffy",
            ["dog", "cat", "brown", "fluffy"],
            id="labelled-lines",
        ),
        pytest.param("1. Dog.\n2. Cat.\n3. Tree.", ["dog", "cat", "tree"], id="sentence-cased"),
        pytest.param("1) dog\n2) cat", ["dog", "cat"], id="paren-numbers"),
        pytest.param("1.dog\n2.cat", ["dog", "cat"], id="numbers-without-space"),
        pytest.param(
            "Here's a list of objects and attributes:\n\n1. dog\n2. cat",
            ["dog", "cat"],
            id="heres-preamble-blank-line",
        ),
        pytest.param("Sure, here you go!\n* dog\n* cat", ["dog", "cat"], id="sure-here-you-go"),
        pytest.param("Items: dog; cat; bird", ["dog", "cat", "bird"], id="label-and-semicolons"),
        pytest.param(
            "1. Dog - brown and fluffy\n2. Cat - sleeping", ["dog", "cat"], id="dash-definitions"
        ),
        pytest.param(
            "1. dog\n2. cat\n\n(These are the main objects.)",
            ["dog", "cat"],
            id="parenthesised-remark-line",
        ),
        pytest.param(
            "1. dog\n2. cat\nThese items describe the scene well.",
            ["dog", "cat"],
            id="trailing-sentence-after-list",
        ),
        pytest.param(
            "1. A red car\n2. An old man\n3. The blue sky",
            ["red car", "old man", "blue sky"],
            id="leading-articles",
        ),
        pytest.param("- \U0001f436 dog\n- cat \U0001f431\ufe0f", ["dog", "cat"], id="emoji"),
        pytest.param(
            "**Objects:**\n- dog\n**Attributes:**\n- brown", ["dog", "brown"], id="bold-headings"
        ),
        pytest.param("dog\r\ncat\r\n", ["dog", "cat"], id="crlf"),
        pytest.param("- dog\n  - puppy\n- cat", ["dog", "puppy", "cat"], id="nested-bullets"),
        pytest.param("dog / cat, red ball", ["dog", "cat", "red ball"], id="slash-separated"),
        pytest.param(
            "Certainly! The objects are: dog, cat.", ["dog", "cat"], id="certainly-inline-colon"
        ),
        pytest.param(
            "1. dog\n2. the dog is running\n3. cat", ["dog", "cat"], id="sentence-item-dropped"
        ),
    ],
)
def test_parse_list_messy_answers(answer: str, expected: list[str]) -> None:
    assert parse_list(answer) == ParseResult(attributes=expected, failure=None)


def test_parse_list_drops_items_longer_than_max_words() -> None:
    answer = "1. dog\n2. a small brown dog sitting on a red sofa\n3. red sofa"
    assert parse_list(answer).attributes == ["dog", "red sofa"]
    assert parse_list(answer, max_words=20).attributes == [
        "dog",
        "small brown dog sitting on a red sofa",
        "red sofa",
    ]


def test_parse_list_stop_words_match_whole_words_only() -> None:
    answer = (
        "dog, blurry background, soft lighting, calm atmosphere, backgrounds, enlightening sign"
    )
    result = parse_list(answer, stop_words=STOP_WORDS)
    assert result.attributes == ["dog", "backgrounds", "enlightening sign"]
    assert result.failure is None


def test_parse_list_stop_words_are_case_insensitive() -> None:
    assert parse_list("Dark Background, cat", stop_words=["BACKGROUND"]).attributes == ["cat"]


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot identify objects in this image.",
        "As an AI, I don't have the ability to see images.",
        "Unfortunately, I am unable to view the picture.",
    ],
)
def test_parse_list_refusal_is_its_own_failure(answer: str) -> None:
    assert parse_list(answer) == ParseResult(attributes=[], failure="refused")


@pytest.mark.parametrize("answer", ["", "   ", "\n\n\t"])
def test_parse_list_blank_answer_is_empty_answer(answer: str) -> None:
    assert parse_list(answer) == ParseResult(attributes=[], failure="empty_answer")


@pytest.mark.parametrize(
    "answer",
    [
        "Here is the list:",
        "1. background\n2. lighting\n3. atmosphere",
        "none",
        "1. 12\n2. ???\n3. ---",
        "\ufffd\ufffd\x00\x07 #@$%, \ufffd~~, 12345, ..., \x01\x02",
        "caf\ufffd, d\x00g, \ufffd\ufffd\ufffd",
    ],
)
def test_parse_list_nothing_usable_is_no_items(answer: str) -> None:
    assert parse_list(answer, stop_words=STOP_WORDS) == ParseResult(
        attributes=[], failure="no_items"
    )


@pytest.mark.parametrize("seed", range(5))
def test_parse_list_random_bytes_never_yield_junk(seed: int) -> None:
    rng = random.Random(seed)
    noise = bytes(rng.randrange(256) for _ in range(500)).decode("utf-8", errors="replace")
    result = parse_list(noise)
    assert result.failure in (None, "no_items")
    assert bool(result.attributes) == (result.failure is None)
    for item in result.attributes:
        assert item.isprintable()
        assert "\ufffd" not in item
        assert item == item.lower().strip()
        assert len(item.split()) <= 6


def test_parse_list_garbage_around_good_items_keeps_the_good_ones() -> None:
    answer = "1. dog\n2. \ufffd\ufffd\x03\n3. #$%^&\n4. red ball"
    assert parse_list(answer).attributes == ["dog", "red ball"]


def test_parse_list_output_is_clean() -> None:
    answer = "Here is the list:\n1. **Big_Red  Barn**.\n2.   Green   FIELD  \n- Sky!"
    for item in parse_list(answer).attributes:
        assert item == item.lower()
        assert item == " ".join(item.split())
        assert not any(ch in item for ch in "*_!.")
    assert parse_list(answer).attributes == ["big red barn", "green field", "sky"]


# ---------------------------------------------------------------------------
# clean_vlm_caption
# ---------------------------------------------------------------------------


def test_clean_vlm_caption_drops_opener_lighting_mood_and_negations() -> None:
    caption = (
        "The image shows a brown dog on a red sofa. The lighting is soft and warm. "
        "There are no people in the room. A lamp stands in the corner! "
        "The overall mood is calm and peaceful. The sofa isn't new."
    )
    assert clean_vlm_caption(caption) == "a brown dog on a red sofa. a lamp stands in the corner!"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("This is a photo of a cat.", "a photo of a cat."),
        ("In this image, a cat sits on a mat.", "a cat sits on a mat."),
        ("In the picture a bird flies.", "a bird flies."),
        ("THE IMAGE DEPICTS a tall tree.", "a tall tree."),
        ("A red bus. The street is not busy.", "a red bus."),
        ("A red bus. There is no driver.", "a red bus."),
        ("A red bus. The seats are empty, without any passengers.", "a red bus."),
        ("A red bus. The windows aren't open.", "a red bus."),
        ("A red bus. The atmosphere is lively.", "a red bus."),
        ("A field.   The scene is illuminated by sunlight.", "a field."),
        ("A boat on a lake", "a boat on a lake"),
        ("", ""),
    ],
)
def test_clean_vlm_caption_cases(caption: str, expected: str) -> None:
    assert clean_vlm_caption(caption) == expected


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def test_phase1_prompt_is_safe_with_braces_in_captions() -> None:
    template = "Web: {web_caption}\nVLM: {vlm_caption}\nList them."
    prompt = phase1_prompt(template, "a {weird} caption {0} }{", 'json {"a": 1} {vlm_caption}')
    assert prompt == 'Web: a {weird} caption {0} }{\nVLM: json {"a": 1} {vlm_caption}\nList them.'


def test_phase1_prompt_missing_placeholder_is_an_error() -> None:
    with pytest.raises(ValueError, match="vlm_caption"):
        phase1_prompt("Web: {web_caption}", "a", "b")


def test_phase2_prompt_numbers_the_attributes() -> None:
    prompt = phase2_prompt("Items:\n{attributes}\nEnd.", ["red wooden chair", "two {dogs}"])
    assert prompt == "Items:\n1. red wooden chair\n2. two {dogs}\nEnd."


def test_shipped_prompt_templates_fill_cleanly() -> None:
    phase1 = (PROMPTS / "attributes_phase1.txt").read_text(encoding="utf-8")
    phase2 = (PROMPTS / "attributes_phase2.txt").read_text(encoding="utf-8")
    caption = (PROMPTS / "caption.txt").read_text(encoding="utf-8")
    assert "{web_caption}" in phase1
    assert "{vlm_caption}" in phase1
    assert "{attributes}" in phase2
    assert "{" not in caption
    filled1 = phase1_prompt(phase1, "WEB {x}", "VLM")
    assert "WEB {x}" in filled1
    assert "VLM" in filled1
    assert "{vlm_caption}" not in filled1
    assert "numbered" in filled1.lower()
    filled2 = phase2_prompt(phase2, ["red wooden chair"])
    assert "1. red wooden chair" in filled2
    assert "{attributes}" not in filled2


# ---------------------------------------------------------------------------
# singularize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "singular"),
    [
        ("men", "man"),
        ("women", "woman"),
        ("children", "child"),
        ("people", "person"),
        ("feet", "foot"),
        ("teeth", "tooth"),
        ("mice", "mouse"),
        ("geese", "goose"),
        ("puppies", "puppy"),
        ("berries", "berry"),
        ("leaves", "leaf"),
        ("knives", "knife"),
        ("wolves", "wolf"),
        ("shelves", "shelf"),
        ("gloves", "glove"),
        ("buses", "bus"),
        ("dresses", "dress"),
        ("boxes", "box"),
        ("benches", "bench"),
        ("dishes", "dish"),
        ("tomatoes", "tomato"),
        ("shoes", "shoe"),
        ("movies", "movie"),
        ("cars", "car"),
        ("horses", "horse"),
        ("houses", "house"),
        ("glass", "glass"),
        ("bus", "bus"),
        ("grass", "grass"),
        ("cactus", "cactus"),
        ("tennis", "tennis"),
        ("jeans", "jeans"),
        ("gas", "gas"),
        ("dog", "dog"),
        ("red cars", "red car"),
        ("wooden benches", "wooden bench"),
        ("young men", "young man"),
        ("t-shirts", "t-shirt"),
    ],
)
def test_singularize(word: str, singular: str) -> None:
    assert singularize(word) == singular


# ---------------------------------------------------------------------------
# merge_phases
# ---------------------------------------------------------------------------


def _texts(merged: list[MergedAttribute]) -> set[str]:
    return {attribute.text for attribute in merged}


def test_merge_overlap_keeps_the_longer_phrase() -> None:
    merged = merge_phases(
        ["red wooden chair", "wooden chair", "big red old car", "red old car", "blue sky"],
        [],
        seed=0,
    )
    assert _texts(merged) == {"red wooden chair", "big red old car", "blue sky"}


def test_merge_overlap_needs_a_longer_phrase_and_enough_shared_words() -> None:
    # Same length: neither is "longer", so both stay.  "red chair" shares 1 of 2 words
    # with "red wooden table" (50 %, 33 %): not a heavy overlap.
    merged = merge_phases(["red car", "red bus", "red chair", "red wooden table"], [], seed=0)
    assert _texts(merged) == {"red car", "red bus", "red chair", "red wooden table"}


def test_merge_drops_over_long_phase1_phrases() -> None:
    merged = merge_phases(
        ["dog", "a dog sitting on a sofa", "brown sofa cushion with stripes"], ["sofa"], seed=0
    )
    assert _texts(merged) == {"dog", "sofa"}
    merged = merge_phases(["brown sofa cushion with stripes"], [], seed=0, max_phrase_words=5)
    assert _texts(merged) == {"brown sofa cushion with stripes"}


def test_merge_long_phrase_does_not_shadow_after_being_dropped() -> None:
    # The 6-word phrase is dropped before the overlap rule, so it cannot remove "red car".
    merged = merge_phases(["red car", "a red car parked on street"], [], seed=0)
    assert _texts(merged) == {"red car"}


def test_merge_plural_dropped_when_singular_present() -> None:
    merged = merge_phases(
        ["dogs", "red boxes", "feet", "cars"], ["dog", "red box", "foot", "leaves"], seed=0
    )
    assert _texts(merged) == {"dog", "red box", "foot", "cars", "leaves"}


def test_merge_maps_human_plurals() -> None:
    merged = merge_phases(["men", "young women", "children", "group of people"], ["people"], seed=3)
    assert _texts(merged) == {"man", "young woman", "child", "person", "group of people"}


def test_merge_tracks_sources() -> None:
    merged = merge_phases(
        ["red wooden chair", "dog", "men"], ["chair", "dog", "man", "leg"], seed=0
    )
    sources = {attribute.text: attribute.source for attribute in merged}
    assert sources == {
        "red wooden chair": "phase1",
        "dog": "both",
        "man": "both",
        "chair": "phase2",
        "leg": "phase2",
    }


def test_merge_dedupes_and_normalises_case_and_spacing() -> None:
    merged = merge_phases(["Dog", "dog", " red  car "], ["DOG", "red car"], seed=0)
    assert sorted((a.text, a.source) for a in merged) == [("dog", "both"), ("red car", "both")]


PHASE1 = ["red car", "green tree", "blue sky", "white cloud", "old man", "tall building"]
PHASE2 = ["car", "tree", "sky", "cloud", "man", "building", "wheel", "window", "roof", "door"]


def test_merge_is_deterministic_for_a_seed_and_sorted_by_length() -> None:
    first = merge_phases(PHASE1, PHASE2, seed=7)
    assert first == merge_phases(list(PHASE1), list(PHASE2), seed=7)
    # The order does not depend on the order of the inputs either.
    assert first == merge_phases(PHASE1[::-1], PHASE2[::-1], seed=7)
    lengths = [len(a.text.split()) for a in first]
    assert lengths == sorted(lengths)


def test_merge_order_varies_with_seed() -> None:
    orders = {tuple(a.text for a in merge_phases(PHASE1, PHASE2, seed=s)) for s in range(10)}
    assert len(orders) > 1
    assert all(set(order) == set(PHASE1) | set(PHASE2) for order in orders)


def test_merge_empty_inputs() -> None:
    assert merge_phases([], [], seed=0) == []
    assert merge_phases(["", "  "], [""], seed=0) == []


def test_parse_then_merge_end_to_end() -> None:
    phase1 = parse_list(
        "Here is the list:\n1. Red wooden chair\n2. wooden chair\n3. Dogs\n4. soft lighting\n"
        "Note: the lighting is warm.",
        stop_words=STOP_WORDS,
    )
    phase2 = parse_list("- chair\n- dog\n- leg", stop_words=STOP_WORDS)
    merged = merge_phases(phase1.attributes, phase2.attributes, seed=1)
    assert {(a.text, a.source) for a in merged} == {
        ("red wooden chair", "phase1"),
        ("chair", "phase2"),
        ("dog", "phase2"),
        ("leg", "phase2"),
    }
    assert merged[-1].text == "red wooden chair"
