"""Constrained attribute answers (format: json) with the tiny demo language models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow.parquet as pq
import pytest

from vlmflow.core import constrained
from vlmflow.core.attribute_text import phase1_prompt
from vlmflow.core.errors import ConfigError
from vlmflow.core.io import write_rows_parquet
from vlmflow.stages import attributes
from vlmflow.stages.attributes import LLMSettings
from vlmflow.stages.caption import CAPTION_SCHEMA

PROMPTS = Path(__file__).resolve().parents[1] / "config" / "prompts"
PHASE1_JSON = (PROMPTS / "attributes_phase1_json.txt").read_text(encoding="utf-8")
PHASE2_JSON = (PROMPTS / "attributes_phase2_json.txt").read_text(encoding="utf-8")
CAPTIONS = [
    ("a red car", "A red car parked on a city street next to a tall building."),
    ("dog", "A dog on the grass in a green field with trees."),
    ("a cat", "A cat sleeping on a sofa near a window, wooden floor, white wall."),
    ("snow", "Mountains covered with snow above a lake."),
    ("sea", "A boat on the sea and a beach with sand and shells."),
    ("bench", "A wooden bench in a park."),
]


def json_settings(model: str, **changes: Any) -> LLMSettings:
    """Phase-1 settings as the demo config has them, in json mode with bounds that
    max_new_tokens holds (check_answer_formats)."""
    base = LLMSettings(
        model=model,
        prompt=PHASE1_JSON,
        max_new_tokens=64,
        temperature=0.6,
        top_p=0.7,
        batch_size=4,
        format="json",
        max_items=4,
        max_item_chars=10,
    )
    return replace(base, **changes)


def write_captions(path: Path) -> Path:
    rows = [
        {
            "key": f"k{i:03d}",
            "web_caption": web,
            "vlm_caption": vlm,
            "failure": None,
            "model": "vlm",
            "prompt_id": "p",
            "settings": "{}",
        }
        for i, (web, vlm) in enumerate(CAPTIONS)
    ]
    write_rows_parquet(path, rows, CAPTION_SCHEMA)
    return path


def test_the_json_schema_takes_short_plain_strings_within_the_bounds() -> None:
    schema = constrained.phase_shape("phase1", 3, 8).schema()
    jsonschema.validate(["red car", "car"], schema)
    for answer in ([], ["a", "b", "c", "d"], ["nine char"], ['say "x"'], ["a\\b"], ["a\nb"], [""]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)
    # Phase 2 may have nothing new to add.
    jsonschema.validate([], constrained.phase_shape("phase2", 3, 8).schema())
    # The longest answer, with a space after each comma, in as many tokens as characters.
    assert len(json.dumps(["12345678"] * 3)) <= constrained.phase_shape("phase2", 3, 8).max_tokens()


def test_every_json_mode_answer_is_an_array_within_the_bounds(
    demo_models: dict[str, str], tmp_path: Path
) -> None:
    settings = json_settings(demo_models["llm"])
    captions = write_captions(tmp_path / "captions.parquet")
    phase1 = tmp_path / "phase1.parquet"
    attributes.run_phase1(captions, phase1, settings, "000000")
    rows = pq.read_table(phase1).to_pylist()
    schema = settings.list_shape("phase1")
    assert schema is not None
    for row in rows:
        assert_within(json.loads(row["raw_answer"]), schema)
        recorded = json.loads(row["settings"])
        assert (recorded["format"], recorded["max_items"], recorded["max_item_chars"]) == (
            "json",
            4,
            10,
        )
    # The demo LLM's noise still yields items for most rows (parse_list reads the array).
    assert sum(1 for row in rows if row["attributes"]) >= len(rows) // 2

    phase2 = tmp_path / "phase2.parquet"
    attributes.run_phase2(phase1, phase2, replace(settings, prompt=PHASE2_JSON), "000000")
    for row in pq.read_table(phase2).to_pylist():
        if row["raw_answer"] is not None:
            assert_within(json.loads(row["raw_answer"]), replace(schema, min_items=0))


def assert_within(answer: Any, shape: constrained.ListShape) -> None:
    """``answer`` is a list within ``shape``. The grammar works on bytes: a random model
    can put bytes in an item that are no UTF-8 character, which decode to U+FFFD, so an
    item's length is checked where it decodes cleanly."""
    assert isinstance(answer, list) and shape.min_items <= len(answer) <= shape.max_items
    for item in answer:
        assert isinstance(item, str) and item and not set(item) & {'"', "\\", "\n", "\x7f"}
        if "\ufffd" not in item:
            jsonschema.validate([item], shape.schema() | {"minItems": 0})


def test_json_greedy_answers_do_not_depend_on_batching_or_the_prefix_cache(
    demo_models: dict[str, str],
) -> None:
    settings = json_settings(demo_models["lm"], do_sample=False)
    tokenizer, model = attributes.load_llm(settings)
    shape = settings.list_shape("phase1")
    assert shape is not None
    constraint = constrained.hf_constraint(tokenizer, model, shape)
    prompts = [phase1_prompt(PHASE1_JSON, web, vlm) for web, vlm in CAPTIONS]
    prefix = attributes.shared_prefix(model, attributes.chat_ids(tokenizer, prompts))
    assert prefix is not None
    batched = attributes.answer_batch(tokenizer, model, prompts, settings, prefix, constraint)
    alone = [
        attributes.answer_batch(tokenizer, model, [p], settings, None, constraint)[0]
        for p in prompts
    ]
    assert batched == alone
    assert all(isinstance(json.loads(answer), list) for answer in alone)
    free = attributes.answer_batch(tokenizer, model, prompts, settings)
    assert not any(answer.startswith("[") for answer in free)  # the constraint did it


def test_a_json_array_cut_by_max_new_tokens_is_counted_as_truncated(
    demo_models: dict[str, str], tmp_path: Path
) -> None:
    settings = json_settings(demo_models["llm"], max_new_tokens=6)
    phase1 = tmp_path / "phase1.parquet"
    attributes.run_phase1(write_captions(tmp_path / "captions.parquet"), phase1, settings, "0")
    rows = pq.read_table(phase1).to_pylist()
    assert {row["failure"] for row in rows} == {"truncated"}
    assert all(row["attributes"] == [] and row["raw_answer"].startswith("[") for row in rows)


def test_text_mode_records_and_fingerprints_no_json_keys() -> None:
    text = LLMSettings(model="m", prompt="p")
    assert not set(constrained.JSON_KEYS) & set(text.recorded())
    assert set(constrained.JSON_KEYS) <= set(replace(text, format="json").recorded())
    with pytest.raises(ValueError, match="format 'yaml'"):
        LLMSettings(model="m", prompt="p", format="yaml")


def test_json_bounds_that_max_new_tokens_cannot_hold_are_named_at_planning() -> None:
    phase = {"format": "json", "max_items": 8, "max_item_chars": 20, "max_new_tokens": 64}
    warnings = constrained.check_answer_formats({"phase1": phase, "phase2": {"format": "text"}})
    [warning] = warnings
    assert "config.attributes.phase1.max_new_tokens: 64" in warning and "194" in warning
    roomy = {"phase1": phase | {"max_new_tokens": 194}, "phase2": {}}
    assert constrained.check_answer_formats(roomy) == []


def test_json_mode_with_a_meta_checkpoint_is_refused_before_any_job(
    demo_models: dict[str, str],
) -> None:
    config = {
        "models": {"llm": "checkpoints/Meta-Llama-3-8B-Instruct/original"},
        "attributes": {"phase1": {"format": "text"}, "phase2": {"format": "json"}},
    }
    with pytest.raises(ConfigError, match=r"attributes\.phase2\.format: json .*Meta-format"):
        attributes.check_backend(config, demo_models["metallama"])
