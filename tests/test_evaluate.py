"""Tests for the eval stage: greedy label lists from a LLaVA folder, soft R/P/F1@k."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vlmflow.core import h5_layout
from vlmflow.core.attribute_text import parse_list
from vlmflow.core.io import read_parquet_rows, write_rows_parquet
from vlmflow.core.metrics import sentence_encoder, soft_prf
from vlmflow.core.models import packaged_minilm_path
from vlmflow.core.shards import iter_samples
from vlmflow.stages import evaluate, h5, train
from vlmflow.stages.attributes import PHASE2_SCHEMA
from vlmflow.stages.evaluate import METRIC_COLUMNS, PREDICTION_SCHEMA, EvalSettings
from vlmflow.stages.train import TrainSettings

INSTRUCTION = "List the objects and attributes in the image."
REFERENCES = {
    "k000": ["dog", "green grass"],
    "k002": ["flower", "leaf", "water drop"],
    "k004": ["mountain", "lake"],
}
SETTINGS = EvalSettings(instruction=INSTRUCTION, top_k=(1, 3), max_new_tokens=12, batch_size=2)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, str]) -> str:
    """A LLaVA built from the demo towers and saved the way the train stage saves it."""
    model, processor = train.build_llava(
        demo_models["vision"], demo_models["lm"], TrainSettings(phase=2)
    )
    folder = tmp_path_factory.mktemp("llava") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def phase2_parquet(tmp_path: Path) -> Path:
    rows = []
    for number in range(5):
        key = f"k{number:03d}"
        labels = REFERENCES.get(key, [])
        rows.append(
            {
                "key": key,
                "raw_answer": "",
                "phase1_attributes": labels,
                "phase2_attributes": [],
                "attributes": labels,
                "attribute_sources": ["phase1"] * len(labels),
                "model": "llm",
                "prompt_id": "p",
                # k001 failed upstream; k003 has no failure but no labels either.
                "failure": "no_attributes" if key == "k001" else None,
            }
        )
    path = tmp_path / "phase2" / "000000.parquet"  # the phase-2 file of shard 000000
    path.parent.mkdir()
    write_rows_parquet(path, rows, PHASE2_SCHEMA)
    return path


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_run_writes_predictions_and_metrics_per_k(
    llava_dir: str, shard_tar: Path, phase2_parquet: Path, tmp_path: Path
) -> None:
    predictions_path = tmp_path / "eval" / "predictions.parquet"
    metrics_path = tmp_path / "eval" / "metrics.tsv"
    table = evaluate.run(
        llava_dir,
        [shard_tar],
        [phase2_parquet],
        packaged_minilm_path(),
        SETTINGS,
        "demo",
        predictions_path,
        metrics_path,
    )

    predictions = pq.read_table(predictions_path)
    assert predictions.schema.equals(PREDICTION_SCHEMA)
    rows = predictions.to_pylist()
    # One row per image with references, in shard order.
    assert [r["key"] for r in rows] == ["k000", "k002", "k004"]
    for row in rows:
        assert row["references"] == REFERENCES[row["key"]]
        assert row["predictions"] == parse_list(row["raw_answer"]).attributes

    with open(metrics_path, encoding="utf-8") as handle:
        assert handle.readline().rstrip("\n").split("\t") == METRIC_COLUMNS
    written = _read_tsv(metrics_path)
    assert [int(r["k"]) for r in written] == [1, 3]
    for line, returned in zip(written, table, strict=True):
        assert line["dataset"] == "demo"
        assert int(line["n_images"]) == 3
        for column in ("recall", "precision", "f1"):
            value = float(line[column])
            assert 0.0 <= value <= 1.0
            assert value == returned[column]
    assert sorted(p.name for p in metrics_path.parent.iterdir()) == [
        "metrics.tsv",
        "predictions.parquet",
    ]

    # The tsv holds soft_prf of the first k parsed predictions.
    embed = sentence_encoder(packaged_minilm_path())
    for line in written:
        k = int(line["k"])
        scores = soft_prf(
            [r["references"] for r in rows], [r["predictions"][:k] for r in rows], embed
        )
        assert float(line["recall"]) == pytest.approx(scores.recall, abs=1e-4)
        assert float(line["precision"]) == pytest.approx(scores.precision, abs=1e-4)
        assert float(line["f1"]) == pytest.approx(scores.f1, abs=1e-4)


def test_eval_prompt_is_the_phase2_training_layout(llava_dir: str, shard_tar: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    seen: list[dict[str, Any]] = []
    real_generate = model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_generate(**kwargs)

    model.generate = spy  # type: ignore[method-assign]
    samples = list(iter_samples(shard_tar))[:2]
    evaluate.predict(model, processor, samples, SETTINGS)
    assert len(seen) == 1
    assert seen[0]["do_sample"] is False
    prompt = seen[0]["input_ids"]

    # The same sample as the h5 stage packs it for phase 2, with its patch slots turned
    # into image tokens as the train stage does: everything before the answer matches.
    tokenizer = processor.tokenizer
    ids = h5.token_ids(tokenizer)
    example = h5.phase2_example(tokenizer, INSTRUCTION, ["dog"], 16, ids, max_seq_len=256)
    assert example is not None
    trained = train.model_inputs(
        torch.from_numpy(np.stack([example.rows])).long(),
        ids.pad,
        model.config.image_token_index,
        16,
    )["input_ids"][0]
    answer_start = int(np.argmax(example.rows[h5_layout.LOSS_MASK])) + 1
    assert prompt.shape == (2, answer_start)
    assert prompt[0].tolist() == trained[:answer_start].tolist()
    assert prompt[1].tolist() == prompt[0].tolist()


def test_eval_prompt_follows_the_chat_template_layout(llava_dir: str) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    tokenizer = AutoProcessor.from_pretrained(llava_dir).tokenizer
    ids = h5.token_ids(tokenizer)
    example = h5.phase2_example(
        tokenizer, INSTRUCTION, ["dog"], 16, ids, max_seq_len=256, style="chat_template"
    )
    assert example is not None
    trained = train.model_inputs(
        torch.from_numpy(np.stack([example.rows])).long(),
        ids.pad,
        model.config.image_token_index,
        16,
    )["input_ids"][0]
    answer_start = int(np.argmax(example.rows[h5_layout.LOSS_MASK])) + 1
    prompt = evaluate.prompt_ids(model, tokenizer, INSTRUCTION, "chat_template")
    assert prompt == trained[:answer_start].tolist()
    assert prompt != evaluate.prompt_ids(model, tokenizer, INSTRUCTION)


def test_predictions_are_greedy_and_independent_of_batching(
    llava_dir: str, shard_tar: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    samples = list(iter_samples(shard_tar))
    first = evaluate.predict(model, processor, samples, replace(SETTINGS, batch_size=1))
    again = evaluate.predict(model, processor, samples, replace(SETTINGS, batch_size=3))
    assert len(first) == len(samples)
    assert first == again


def test_one_shot_returns_k_labels_ranked_by_their_probability(
    llava_dir: str, shard_tar: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    samples = list(iter_samples(shard_tar))[:2]
    settings = replace(SETTINGS, decoding="one_shot", top_k=(2, 4), label_max_tokens=4)
    ranked = evaluate.one_shot(model, processor, samples, settings)
    tokenizer = processor.tokenizer
    ends = evaluate.delimiter_ids(tokenizer, model)
    assert "," in tokenizer.decode(sorted(ends)) and tokenizer.eos_token_id in ends
    prompt = evaluate.prompt_ids(model, tokenizer, INSTRUCTION)
    for sample, labels in zip(samples, ranked, strict=True):
        # At most max(top_k) labels (branches that decode to the same text merge), best first.
        assert 1 <= len(labels) <= 4
        assert [label.logprob for label in labels] == sorted(
            (label.logprob for label in labels), reverse=True
        )
        assert len({label.text.lower() for label in labels}) == len(labels)
        pixels = processor.image_processor(images=[sample.image()], return_tensors="pt")
        for label in labels:
            assert label.text and not any(t in ends for t in label.tokens)
            assert 1 <= len(label.tokens) <= 4
            # The branch's probability, recomputed in one pass without the shared cache.
            ids = torch.tensor([prompt + list(label.tokens)])
            with torch.inference_mode():
                logits = model(input_ids=ids, pixel_values=pixels["pixel_values"]).logits[0]
            logprobs = logits.float().log_softmax(-1)
            expected = sum(
                float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(label.tokens)
            )
            assert label.logprob == pytest.approx(expected, abs=1e-4)


def test_run_with_one_shot_records_scores_and_both_metrics(
    llava_dir: str, shard_tar: Path, phase2_parquet: Path, tmp_path: Path
) -> None:
    settings = replace(SETTINGS, decoding="one_shot", top_k=(1, 3), label_max_tokens=3)
    table = evaluate.run(
        llava_dir,
        [shard_tar],
        [phase2_parquet],
        packaged_minilm_path(),
        settings,
        "demo",
        tmp_path / "p.parquet",
        tmp_path / "m.tsv",
    )
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    for row in rows:
        assert len(row["scores"]) == len(row["predictions"]) <= 3
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert all(0.0 < p <= 1.0 for p in row["scores"])
    assert [(r["decoding"], r["k"]) for r in table] == [("one_shot", 1), ("one_shot", 3)]
    for line in table:
        for column in ("strict_recall", "strict_precision", "strict_f1"):
            assert 0.0 <= line[column] <= 1.0


def test_run_without_references_fails_clearly(
    llava_dir: str, shard_tar: Path, tmp_path: Path
) -> None:
    path = tmp_path / "phase2.parquet"
    write_rows_parquet(path, [], PHASE2_SCHEMA)
    with pytest.raises(ValueError, match="no image with reference"):
        evaluate.run(
            llava_dir,
            [shard_tar],
            [path],
            packaged_minilm_path(),
            SETTINGS,
            "demo",
            tmp_path / "p.parquet",
            tmp_path / "m.tsv",
        )
    assert not (tmp_path / "p.parquet").exists()
    assert not (tmp_path / "m.tsv").exists()


def test_a_key_repeated_in_another_shard_keeps_each_shards_labels(
    llava_dir: str, shard_tar: Path, phase2_parquet: Path, tmp_path: Path
) -> None:
    """The same keys again in shard 000001 with other labels, one of them left out as a
    repeat: every scored image is scored against its own shard's labels."""
    second_tar = tmp_path / "second" / "000001.tar"
    second_tar.parent.mkdir()
    shutil.copyfile(shard_tar, second_tar)
    rows = read_parquet_rows(phase2_parquet)
    for row in rows:
        if row["attributes"]:
            row["attributes"] = row["phase1_attributes"] = [f"other {row['key']}"]
            row["attribute_sources"] = ["phase1"]
    second_parquet = phase2_parquet.parent / "000001.parquet"
    write_rows_parquet(second_parquet, rows, PHASE2_SCHEMA)
    evaluate.run(
        llava_dir,
        [shard_tar, second_tar],
        [phase2_parquet, second_parquet],
        packaged_minilm_path(),
        SETTINGS,
        "demo",
        tmp_path / "predictions.parquet",
        tmp_path / "metrics.tsv",
        left_out={("000001", "k002"): "repeat"},
    )
    scored = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    assert [(r["key"], r["references"]) for r in scored] == [
        ("k000", REFERENCES["k000"]),
        ("k002", REFERENCES["k002"]),
        ("k004", REFERENCES["k004"]),
        ("k000", ["other k000"]),
        ("k004", ["other k004"]),
    ]
