"""Answers in the shapes real instruct models give, each with the items it must give or
the reason it gives none (never a shorter list)."""

from __future__ import annotations

import pytest

from vlmflow.core.attribute_text import parse_list

FENCE = "```"
# (shape, answer, expected items or a failure reason)
SHAPES: list[tuple[str, str, list[str] | str]] = [
    ("json array", '["red car", "tree", "blue sky"]', ["red car", "tree", "blue sky"]),
    ("json object", '{"attributes": ["red car", "tree"]}', ["red car", "tree"]),
    (
        "json object, two lists",
        '{"objects": ["car", "tree"], "attributes": ["red car"]}',
        ["car", "tree", "red car"],
    ),
    ("json object, nested", '{"scene": {"objects": ["dog", "ball"]}}', ["dog", "ball"]),
    ("json list of objects", '[{"name": "dog"}, {"name": "red ball"}]', ["dog", "red ball"]),
    ("json items with commas", '["dog, cat", "tree"]', ["dog", "cat", "tree"]),
    ("json, fenced", f'{FENCE}json\n["dog", "grass"]\n{FENCE}', ["dog", "grass"]),
    ("json, fenced without language", f'{FENCE}\n["dog", "grass"]\n{FENCE}', ["dog", "grass"]),
    (
        "json, fenced, preamble and note",
        f'Here is the list:\n{FENCE}json\n["dog", "grass"]\n{FENCE}\nLet me know!',
        ["dog", "grass"],
    ),
    ("json after a preamble", 'Sure! Here are the attributes:\n["dog", "ball"]', ["dog", "ball"]),
    ("json, trailing note", '["dog", "ball"]\nNote: the ball is red.', ["dog", "ball"]),
    ("json, trailing comma", '["dog", "cat",]', ["dog", "cat"]),
    ("json, smart quotes", "[\u201cdog\u201d, \u201cred ball\u201d]", ["dog", "red ball"]),
    ("json cut by max_new_tokens", '["dog", "green grass", "wooden ben', "truncated"),
    ("json cut inside a fence", f'{FENCE}json\n["dog", "gra', "truncated"),
    ("text cut inside a fence", f"{FENCE}\ndog\ncat", "truncated"),
    ("json object without a list", '{"answer": "dog"}', "unparsed"),
    ("json empty array", "[]", "no_items"),
    ("python list", "['dog', 'green grass']", ["dog", "green grass"]),
    ("python list, apostrophe", "[\"man's hat\", 'dog']", ["man's hat", "dog"]),
    ("list without quotes", "[dog, cat, tree]", ["dog", "cat", "tree"]),
    ("llama 3 end of turn", "dog, cat, tree<|eot_id|>", ["dog", "cat", "tree"]),
    (
        "llama 3 header and end",
        "<|start_header_id|>assistant<|end_header_id|>\n\ndog, cat<|eot_id|>",
        ["dog", "cat"],
    ),
    (
        "llama 3, a turn after the end",
        "dog, cat<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nmore",
        ["dog", "cat"],
    ),
    ("chatml", "<|im_start|>assistant\ndog, cat<|im_end|>", ["dog", "cat"]),
    (
        "chatml, a turn after the end",
        "dog\ncat<|im_end|>\n<|im_start|>user\nthanks",
        ["dog", "cat"],
    ),
    ("mistral end", "1. dog\n2. cat</s>", ["dog", "cat"]),
    ("gemma end", "- dog\n- cat<end_of_turn>", ["dog", "cat"]),
    ("phi end", "dog\ncat<|end|>", ["dog", "cat"]),
    ("role line", "assistant\n\n- dog\n- cat", ["dog", "cat"]),
    ("vicuna role", "ASSISTANT: dog, cat, tree", ["dog", "cat", "tree"]),
    ("response header", "### Response:\n1. dog\n2. cat", ["dog", "cat"]),
    ("answer label", "Answer: dog, cat", ["dog", "cat"]),
    ("a new turn in text", "dog, cat\nUSER: and more?", ["dog", "cat"]),
    (
        "reasoning, then json",
        '<think>The image shows a dog. I list objects.</think>\n["dog", "ball"]',
        ["dog", "ball"],
    ),
    ("reasoning, then a list", "<think>hmm</think>\n\n1. dog\n2. ball", ["dog", "ball"]),
    (
        "reasoning opened by the template",
        "The user wants objects.\n</think>\n\ndog, ball",
        ["dog", "ball"],
    ),
    ("reasoning cut off", "<think>Let me look at the image, there is a dog and", "truncated"),
    ("bullets", "\u2022 dog\n\u2022 red ball", ["dog", "red ball"]),
    (
        "bullets on one line",
        "\u2022 dog \u2022 red ball \u2022 grass",
        ["dog", "red ball", "grass"],
    ),
    ("pipes", "dog | red ball | grass", ["dog", "red ball", "grass"]),
    (
        "markdown table",
        "| object | attribute |\n|---|---|\n| dog | brown |\n| ball | red |",
        ["dog", "brown", "ball", "red"],
    ),
    ("bold items", "1. **Dog**\n2. **Red ball**", ["dog", "red ball"]),
    ("bold terms with definitions", "- **Dog**: a brown dog\n- **Ball**: red", ["dog", "ball"]),
    ("labelled lines", "Objects: dog, cat\nAttributes: brown dog", ["dog", "cat", "brown dog"]),
    ("refusal", "I'm sorry, but I can't help with that.", "refused"),
    (
        "refusal after a header",
        "<|start_header_id|>assistant<|end_header_id|>\n\nI cannot describe this image.",
        "refused",
    ),
    ("only an end token", "<|eot_id|>", "empty_answer"),
    ("blank", "  \n ", "empty_answer"),
]


@pytest.mark.parametrize(("shape", "answer", "expected"), SHAPES, ids=[s[0] for s in SHAPES])
def test_parse_every_answer_shape(shape: str, answer: str, expected: list[str] | str) -> None:
    parsed = parse_list(answer)
    if isinstance(expected, str):
        assert (parsed.failure, parsed.attributes) == (expected, [])
    else:
        assert (parsed.failure, parsed.attributes) == (None, expected)


def test_parse_strips_the_tokenizers_own_special_tokens() -> None:
    """A token the common chat markers do not cover is stripped when the tokenizer has it,
    so the items next to it are kept."""
    answer = "dog <extra_id_0> cat<pad><pad>"
    assert parse_list(answer, special_tokens=["<extra_id_0>", "<pad>"]).attributes == [
        "dog",
        "cat",
    ]


def test_the_table_has_forty_distinct_shapes() -> None:
    assert len({shape for shape, *_ in SHAPES}) == len(SHAPES) >= 40
