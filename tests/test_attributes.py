"""Tests for the attribute stages with the tiny demo language models."""

from __future__ import annotations

import json
import os
import signal
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from vlmflow.core.attribute_text import clean_vlm_caption, phase1_prompt
from vlmflow.core.io import write_rows_parquet
from vlmflow.core.progress import Interrupted, progress_path
from vlmflow.core.prompts import prompt_id
from vlmflow.stages import attributes
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA, LLMSettings, generation, phases
from vlmflow.stages.caption import CAPTION_SCHEMA

PROMPTS = Path(__file__).resolve().parents[1] / "config" / "prompts"
PHASE1_TEMPLATE = (PROMPTS / "attributes_phase1.txt").read_text(encoding="utf-8")
PHASE2_TEMPLATE = (PROMPTS / "attributes_phase2.txt").read_text(encoding="utf-8")


class Recorder:
    """Wraps answer_batch to record which prompts reach the model.

    With ``answers`` ({text in the prompt: answer}) it answers without a model.
    """

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.prompts: list[str] = []
        self.batches = 0
        self.answers = answers
        self.real = attributes.answer_batch

    def __call__(
        self,
        tokenizer: Any,
        model: Any,
        prompts: list[str],
        settings: LLMSettings,
        prefix: attributes.SharedPrefix | None = None,
        constraint: Any = None,
    ) -> list[str]:
        self.prompts += prompts
        self.batches += 1
        if self.answers is not None:
            return [
                next(answer for text, answer in self.answers.items() if text in prompt)
                for prompt in prompts
            ]
        return self.real(tokenizer, model, prompts, settings, prefix, constraint)


class FakeTokenizer:
    """Just enough of a tokenizer for batching by length, when no model is loaded."""

    def apply_chat_template(self, chat: list[dict[str, str]], **kwargs: Any) -> str:
        return chat[0]["content"]

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        # One id per word; the first differs between texts, so prompts share no prefix
        # and nothing asks the (absent) model for a prefix cache.
        words = len(text.split())
        return {"input_ids": [zlib.crc32(text.encode()), *range(1, words)]}


def no_model(settings: LLMSettings) -> tuple[Any, Any]:
    return FakeTokenizer(), None


def _caption_rows() -> list[dict[str, Any]]:
    return [
        {"key": "k000", "web_caption": "a red car", "vlm_caption": "A red car.", "failure": None},
        {"key": "k001", "web_caption": "UNREADABLE", "vlm_caption": "", "failure": "caption_error"},
        {
            "key": "k002",
            "web_caption": "a dog on the grass in a green field",
            "vlm_caption": "The image shows a brown dog lying on green grass near trees.",
            "failure": None,
        },
        {"key": "k003", "web_caption": "a cat", "vlm_caption": "A cat on a sofa.", "failure": None},
    ]


@pytest.fixture
def captions_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "captions.parquet"
    rows = [{**row, "model": "vlm", "prompt_id": "p", "settings": "{}"} for row in _caption_rows()]
    write_rows_parquet(path, rows, CAPTION_SCHEMA)
    return path


def _phase1_row(key: str, attributes_: list[str], failure: str | None) -> dict[str, Any]:
    return {
        "key": key,
        "web_caption": "w",
        "vlm_caption": "v",
        "raw_answer": None if failure == "caption_failed" else "raw",
        "attributes": attributes_,
        "model": "llm",
        "prompt_id": "p",
        "failure": failure,
    }


@pytest.fixture
def phase1_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "phase1.parquet"
    rows = [
        _phase1_row("k000", ["red wooden chair", "dogs", "green grass"], None),
        _phase1_row("k001", [], "caption_failed"),
        _phase1_row("k002", [], "no_items"),
        _phase1_row("k003", ["cat", "sofa"], None),
    ]
    write_rows_parquet(path, rows, PHASE1_SCHEMA)
    return path


# ---------------------------------------------------------------------------
# answer_batch and _answers: batches sorted by length, answers back for their own key
# ---------------------------------------------------------------------------


def test_answers_come_back_for_their_own_key_whatever_the_batching(
    demo_models: dict[str, str], tmp_path: Path
) -> None:
    # The base demo LM: its greedy answers differ from prompt to prompt (the instruct
    # demo LLM is biased toward newlines, which strip to empty answers).
    settings = LLMSettings(model=demo_models["lm"], prompt="", do_sample=False, max_new_tokens=10)
    tokenizer, model = attributes.load_llm(settings)
    assert tokenizer.padding_side == "left"
    prompts = [
        "a red car parked on a city street next to a tall building at sunset",
        "dog",
        "a cat sleeping on a sofa near a window",
        "mountains covered with snow above a lake, clouds, forest, rocks, river",
        "flower",
    ]
    keys = [f"k{n}" for n in range(len(prompts))]
    alone = [attributes.answer_batch(tokenizer, model, [p], settings)[0] for p in prompts]
    assert len(set(alone)) == len(prompts), "answers must differ for the order check to bite"
    # Batches are formed in prompt-length order, not key order.
    assert attributes.length_order(tokenizer, prompts) == [1, 4, 2, 3, 0]
    source = tmp_path / "input.parquet"
    source.write_bytes(b"stands in for the phase's input file")
    for batch_size in (1, 3, 5):
        answers, _ = phases._answers(
            keys,
            prompts,
            replace(settings, batch_size=batch_size),
            "phase1",
            "000000",
            source,
            tmp_path / f"out-{batch_size}.parquet",
        )
        assert [answers[key]["answer"] for key in keys] == alone, f"batch_size={batch_size}"


def test_shared_prompt_prefix_is_computed_once_and_changes_no_answer(
    demo_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = LLMSettings(
        model=demo_models["lm"], prompt=PHASE1_TEMPLATE, do_sample=False, max_new_tokens=10
    )
    tokenizer, model = attributes.load_llm(settings)
    captions = [
        ("a red car", "A red car parked on a city street next to a tall building."),
        ("dog", "A dog."),
        ("a cat", "A cat sleeping on a sofa near a window, wooden floor, white wall."),
        ("snow", "Mountains covered with snow above a lake."),
    ]
    prompts = [phase1_prompt(PHASE1_TEMPLATE, web, vlm) for web, vlm in captions]
    prefix = attributes.shared_prefix(model, attributes.chat_ids(tokenizer, prompts))
    assert prefix is not None
    # The chat header and the template's instructions: most of each prompt.
    assert len(prefix.ids) > 0.7 * min(
        len(tokenizer(generation._chat(tokenizer, p), add_special_tokens=False)["input_ids"])
        for p in prompts
    )
    plain = attributes.answer_batch(tokenizer, model, prompts, settings)
    alone = [attributes.answer_batch(tokenizer, model, [p], settings)[0] for p in prompts]
    cached = attributes.answer_batch(tokenizer, model, prompts, settings, prefix=prefix)
    assert len(set(alone)) > 1
    assert cached == plain == alone
    # The cache is copied per batch, so a second batch starts from the same prefix.
    assert attributes.answer_batch(tokenizer, model, prompts[:2], settings, prefix) == alone[:2]
    # Prompts that share only a few tokens get no prefix cache.
    short = attributes.chat_ids(tokenizer, ["a dog", "a cat on a sofa"])
    assert attributes.shared_prefix(model, short) is None

    # The stage computes the prefix once per shard, not once per batch.
    calls = []
    real = attributes.shared_prefix

    def counting(*args: Any) -> attributes.SharedPrefix | None:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(generation, "shared_prefix", counting)
    source = tmp_path / "input.parquet"
    source.write_bytes(b"stands in for the phase's input file")
    keys = [f"k{n}" for n in range(len(prompts))]
    answers, markers = phases._answers(
        keys,
        prompts,
        replace(settings, batch_size=1),
        "phase1",
        "000000",
        source,
        tmp_path / "out.parquet",
    )
    assert calls == [1]
    assert [answers[key]["answer"] for key in keys] == alone
    # The tokenizer's own special tokens come back with the answers, for parse_list.
    assert {"<|begin_of_text|>", "<|eot_id|>"} <= set(markers)


def test_generation_stops_on_end_of_turn(
    demo_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = LLMSettings(model=demo_models["llm"], prompt="", do_sample=False, max_new_tokens=4)
    tokenizer, model = attributes.load_llm(settings)
    seen: dict[str, Any] = {}
    real_generate = model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    attributes.answer_batch(tokenizer, model, ["a dog"], settings)
    assert set(seen["eos_token_id"]) == {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
    }
    assert seen["pad_token_id"] == tokenizer.pad_token_id
    assert seen["do_sample"] is False
    assert "temperature" not in seen


# ---------------------------------------------------------------------------
# Phase 1
# ---------------------------------------------------------------------------


def test_phase1_with_demo_llm_keeps_every_key_and_skips_failed_captions(
    demo_models: dict[str, str],
    captions_parquet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(generation, "answer_batch", recorder)
    settings = LLMSettings(
        model=demo_models["llm"], prompt=PHASE1_TEMPLATE, max_new_tokens=16, batch_size=2
    )
    out = tmp_path / "phase1" / "000000.parquet"
    counts = attributes.run_phase1(captions_parquet, out, settings, "000000")

    table = pq.read_table(out)
    assert table.schema.equals(PHASE1_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["k000", "k001", "k002", "k003"]
    # The model saw the three good captions only, with the cleaned VLM caption.
    assert len(recorder.prompts) == 3
    assert not any("UNREADABLE" in p for p in recorder.prompts)
    assert (
        phase1_prompt(
            PHASE1_TEMPLATE,
            "a dog on the grass in a green field",
            "a brown dog lying on green grass near trees.",
        )
        in recorder.prompts
    )
    failed = rows[1]
    assert failed["failure"] == "caption_failed"
    assert failed["raw_answer"] is None
    assert failed["attributes"] == []
    for row in rows[:1] + rows[2:]:
        assert row["raw_answer"] is not None
        assert row["failure"] in (None, "empty_answer", "no_items")
        assert (row["failure"] is None) == bool(row["attributes"])
    for row in rows:
        assert row["model"] == demo_models["llm"]
        assert row["prompt_id"] == prompt_id(PHASE1_TEMPLATE)
        recorded = json.loads(row["settings"])
        assert recorded["max_new_tokens"] == 16 and recorded["batch_size"] == 2
        assert "prompt" not in recorded
    n_failed = sum(r["failure"] is not None for r in rows)
    assert counts == {"in": 4, "ok": 4 - n_failed, "failed": n_failed}


def test_phase1_parses_each_answer_for_its_own_key(
    captions_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {
        "a red car": "1. Red car\n2. road",
        "a dog on the grass": "   ",
        "a cat": "Here is the list:\n- cat\n- sofa",
    }
    monkeypatch.setattr(generation, "answer_batch", Recorder(answers))
    monkeypatch.setattr(generation, "load_llm", no_model)
    out = tmp_path / "phase1.parquet"
    settings = LLMSettings(model="llm", prompt=PHASE1_TEMPLATE)
    counts = attributes.run_phase1(captions_parquet, out, settings, "000000")
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["k000"]["attributes"] == ["red car", "road"]
    assert rows["k000"]["failure"] is None
    assert rows["k001"]["failure"] == "caption_failed"
    assert rows["k002"]["attributes"] == []
    assert rows["k002"]["failure"] == "empty_answer"
    assert rows["k003"]["attributes"] == ["cat", "sofa"]
    assert counts == {"in": 4, "ok": 2, "failed": 2}


def test_phase1_with_only_failed_captions_never_loads_the_model(tmp_path: Path) -> None:
    captions = tmp_path / "captions.parquet"
    rows = [
        {**row, "failure": "caption_error: broken", "model": "m", "prompt_id": "p", "settings": ""}
        for row in _caption_rows()
    ]
    write_rows_parquet(captions, rows, CAPTION_SCHEMA)
    settings = LLMSettings(model=str(tmp_path / "no-such-model"), prompt=PHASE1_TEMPLATE)
    counts = attributes.run_phase1(captions, tmp_path / "out.parquet", settings, "000000")
    assert counts == {"in": 4, "ok": 0, "failed": 4}
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["failure"] for r in out] == ["caption_failed"] * 4


# ---------------------------------------------------------------------------
# Phase 2
# ---------------------------------------------------------------------------


def test_phase2_with_demo_llm_keeps_every_key_and_aligns_sources(
    demo_models: dict[str, str],
    phase1_parquet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(generation, "answer_batch", recorder)
    settings = LLMSettings(model=demo_models["llm"], prompt=PHASE2_TEMPLATE, max_new_tokens=16)
    out = tmp_path / "phase2.parquet"
    counts = attributes.run_phase2(phase1_parquet, out, settings, "000000")

    table = pq.read_table(out)
    assert table.schema.equals(PHASE2_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["k000", "k001", "k002", "k003"]
    # Only the rows with phase-1 attributes go to the model.
    assert len(recorder.prompts) == 2
    assert any("1. red wooden chair\n2. dogs\n3. green grass" in p for p in recorder.prompts)
    for row in rows:
        assert len(row["attribute_sources"]) == len(row["attributes"])
        assert set(row["attribute_sources"]) <= {"phase1", "phase2", "both"}
        assert len(set(row["attributes"])) == len(row["attributes"])
    by_key = {r["key"]: r for r in rows}
    assert by_key["k001"]["failure"] == "caption_failed"
    assert by_key["k001"]["raw_answer"] is None
    assert by_key["k002"]["failure"] == "no_items"
    assert by_key["k002"]["attributes"] == []
    for key in ("k000", "k003"):
        row = by_key[key]
        assert row["failure"] is None
        assert row["raw_answer"] is not None
    # Phase-1 attributes always stand, whatever phase 2 answered.
    for key, kept in (("k000", {"red wooden chair", "green grass"}), ("k003", {"cat", "sofa"})):
        source = dict(zip(by_key[key]["attributes"], by_key[key]["attribute_sources"], strict=True))
        assert kept <= set(source)
        assert all(source[text] in ("phase1", "both") for text in kept)
    phase2_failed = sum(r["phase2_failure"] is not None for r in rows)
    assert counts == {"in": 4, "ok": 2, "failed": 2, "phase2_failed": phase2_failed}


def test_phase2_merges_new_items_and_is_deterministic(
    phase1_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"1. red wooden chair": "1. chair\n2. dog\n3. leg", "2. sofa": "none"}
    monkeypatch.setattr(generation, "answer_batch", Recorder(answers))
    monkeypatch.setattr(generation, "load_llm", no_model)
    settings = LLMSettings(model="llm", prompt=PHASE2_TEMPLATE)
    attributes.run_phase2(phase1_parquet, tmp_path / "a.parquet", settings, "000000")
    attributes.run_phase2(phase1_parquet, tmp_path / "b.parquet", settings, "000000")
    first = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert first == pq.read_table(tmp_path / "b.parquet").to_pylist()

    row = first[0]
    assert row["phase2_attributes"] == ["chair", "dog", "leg"]
    source = dict(zip(row["attributes"], row["attribute_sources"], strict=True))
    # "dogs" is dropped for its singular "dog", which phase 2 supplied.
    assert source == {
        "chair": "phase2",
        "dog": "phase2",
        "leg": "phase2",
        "green grass": "phase1",
        "red wooden chair": "phase1",
    }
    # Fewer words first.
    words = [len(a.split()) for a in row["attributes"]]
    assert words == sorted(words)
    # "none" adds nothing, but the phase-1 attributes still stand.
    cat = first[3]
    assert cat["phase2_attributes"] == []
    assert sorted(cat["attributes"]) == ["cat", "sofa"]
    assert cat["attribute_sources"] == ["phase1", "phase1"]
    assert cat["failure"] is None


def test_phase2_generation_error_keeps_phase1_attributes_and_is_counted(
    phase1_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"1. red wooden chair": "1. chair\n2. leg", "2. sofa": "unused"}

    class FailsOnSofa(Recorder):
        def __call__(self, *args: Any, **kwargs: Any) -> list[str]:
            if any("2. sofa" in prompt for prompt in args[2]):
                raise RuntimeError("CUDA out of memory")
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(generation, "answer_batch", FailsOnSofa(answers))
    monkeypatch.setattr(generation, "load_llm", no_model)
    settings = LLMSettings(model="llm", prompt=PHASE2_TEMPLATE, batch_size=2)
    counts = attributes.run_phase2(phase1_parquet, tmp_path / "out.parquet", settings, "000000")
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    cat = rows["k003"]
    # Kept with its phase-1 attributes, the phase-2 failure recorded with its reason.
    assert cat["failure"] is None
    assert sorted(cat["attributes"]) == ["cat", "sofa"]
    assert cat["raw_answer"] is None
    assert cat["phase2_failure"] == "generation_error: CUDA out of memory"
    assert rows["k000"]["phase2_failure"] is None
    assert rows["k000"]["phase2_attributes"] == ["chair", "leg"]
    # Rows that never reached phase 2 (failed earlier) have no phase-2 failure of their own.
    assert rows["k001"]["phase2_failure"] is None
    assert counts == {"in": 4, "ok": 2, "failed": 2, "phase2_failed": 1}


def test_phase2_row_without_attributes_fails_as_no_attributes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "phase1.parquet"
    write_rows_parquet(path, [_phase1_row("k000", [], None)], PHASE1_SCHEMA)
    settings = LLMSettings(model=str(tmp_path / "no-such-model"), prompt=PHASE2_TEMPLATE)
    counts = attributes.run_phase2(path, tmp_path / "out.parquet", settings, "000000")
    assert counts == {"in": 1, "ok": 0, "failed": 1, "phase2_failed": 0}
    row = pq.read_table(tmp_path / "out.parquet").to_pylist()[0]
    assert row["failure"] == "no_attributes"
    assert row["raw_answer"] is None


def test_phase1_sigterm_then_restart_redoes_at_most_one_batch(
    captions_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"a red car": "red car", "a dog on the grass": "dog, grass", "a cat": "cat, sofa"}
    monkeypatch.setattr(generation, "load_llm", no_model)
    settings = LLMSettings(model="llm", prompt=PHASE1_TEMPLATE, batch_size=1)
    monkeypatch.setattr(generation, "answer_batch", Recorder(answers))
    attributes.run_phase1(captions_parquet, tmp_path / "full.parquet", settings, "000000")

    class StopInSecondBatch(Recorder):
        def __call__(self, *args: Any, **kwargs: Any) -> list[str]:
            if self.batches == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(*args, **kwargs)

    out = tmp_path / "phase1" / "000000.parquet"
    monkeypatch.setattr(generation, "answer_batch", StopInSecondBatch(answers))
    with pytest.raises(Interrupted):
        attributes.run_phase1(captions_parquet, out, settings, "000000")
    resumed = Recorder(answers)
    monkeypatch.setattr(generation, "answer_batch", resumed)
    attributes.run_phase1(captions_parquet, out, settings, "000000")
    assert resumed.batches == 2  # of 3: the interrupted batch and the one never started
    assert pq.read_table(out).to_pylist() == pq.read_table(tmp_path / "full.parquet").to_pylist()
    assert not progress_path(out).exists()


def test_prompts_that_leave_no_room_for_the_answer_fail_as_prompt_too_long(
    captions_parquet: Path, tmp_path: Path, demo_models: dict[str, str]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models["llm"])
    rows = [r for r in _caption_rows() if r["failure"] is None]
    prompts = [
        phase1_prompt(PHASE1_TEMPLATE, r["web_caption"], clean_vlm_caption(r["vlm_caption"]))
        for r in rows
    ]
    ids = attributes.chat_ids(tokenizer, prompts)
    lengths = {r["key"]: len(row) for r, row in zip(rows, ids, strict=True)}
    longest = max(lengths, key=lengths.__getitem__)
    # A context that holds every prompt and 4 new tokens but the longest one.
    context = lengths[longest] + 3
    assert sorted(lengths.values())[-2] + 4 <= context
    settings = LLMSettings(
        model=demo_models["llm"], prompt=PHASE1_TEMPLATE, max_new_tokens=4, max_seq_len=context
    )
    out = tmp_path / "phase1.parquet"
    counts = attributes.run_phase1(captions_parquet, out, settings, "000000")
    by_key = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert by_key[longest]["failure"] == "prompt_too_long"
    assert all(by_key[k]["failure"] != "prompt_too_long" for k in lengths if k != longest)
    assert counts["in"] == len(_caption_rows())

    # A context no prompt fits: the job fails, naming the setting, instead of counting
    # every sample as a failure.
    tight = LLMSettings(
        model=demo_models["llm"], prompt=PHASE1_TEMPLATE, max_new_tokens=4, max_seq_len=16
    )
    with pytest.raises(ValueError, match=r"every prompt leaves no room .*attributes.max_seq_len"):
        attributes.run_phase1(captions_parquet, tmp_path / "none.parquet", tight, "000000")
    assert not (tmp_path / "none.parquet").exists()
