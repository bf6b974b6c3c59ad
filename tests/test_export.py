"""Tests for the exports: LLaVA conversations and the Hugging Face dataset with its card."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_image
from vlmflow.core.contract import read_duplicates, write_duplicates
from vlmflow.core.io import write_json, write_rows_parquet
from vlmflow.core.prompts import LABEL_SEPARATOR, prompt_id
from vlmflow.core.shards import iter_samples
from vlmflow.stages import export
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
from vlmflow.stages.caption import CAPTION_SCHEMA
from vlmflow.stages.export import CardInfo, ExportError, LlavaSettings, ShardFiles

INSTRUCTION = "List the objects and attributes in the image."
KEYS = [f"k{n:03d}" for n in range(5)]
# k001's caption failed, k002 had no attributes in phase 1; the others are kept.
ATTRIBUTES = {"k000": ["red square", "paper"], "k003": ["yellow"], "k004": ["grey", "card"]}
VLM = "org/vlm@" + "a" * 40
LLM = "org/llm@" + "b" * 40
ENGINE = "transformers 5.23.0"


@dataclass
class Dataset:
    """One shard's stage outputs, as the stages write them."""

    root: Path
    files: ShardFiles
    images: Path  # the h5 image root; the shard's folder is images/000000
    prompts: dict[str, Path]


def _caption_rows() -> list[dict[str, Any]]:
    return [
        {
            "key": key,
            "web_caption": f"a photo of a coloured square number {n}",
            "vlm_caption": None if key == "k001" else f"a square, {key}",
            "model": VLM,
            "engine": None if key == "k001" else ENGINE,
            "prompt_id": "cap",
            "failure": "caption_error: out of memory" if key == "k001" else None,
        }
        for n, key in enumerate(KEYS)
    ]


def _phase_rows(phase: int) -> list[dict[str, Any]]:
    failures = {"k001": "caption_failed", "k002": "no_items"}
    rows = []
    for key in KEYS:
        attributes = ATTRIBUTES.get(key, [])
        row = {"key": key, "attributes": attributes, "model": LLM, "engine": ENGINE}
        row.update(prompt_id=f"p{phase}", failure=failures.get(key))
        if phase == 2:
            row.update(phase1_attributes=attributes, attribute_sources=["phase1"] * len(attributes))
        rows.append(row)
    return rows


@pytest.fixture
def dataset(shard_tar: Path, tmp_path: Path) -> Dataset:
    """The conftest shard (k000..k004) with its stats, parquets, h5 images and prompts."""
    root = tmp_path / "results"
    files = ShardFiles(
        tar=shard_tar,
        stats=root / "stats.json",
        captions=root / "captions.parquet",
        phase1=root / "phase1.parquet",
        phase2=root / "phase2.parquet",
    )
    root.mkdir()
    write_json(
        files.stats,
        {"shard": "000000", "source": "url_list:data/t.tsv", "rows_in": 6, "ok": 5}
        | {"failed": {"http_status": 1}, "failures": []},
    )
    write_rows_parquet(files.captions, _caption_rows(), CAPTION_SCHEMA)
    write_rows_parquet(files.phase1, _phase_rows(1), PHASE1_SCHEMA)
    write_rows_parquet(files.phase2, _phase_rows(2), PHASE2_SCHEMA)
    # The h5 stage writes the images of the samples phase 2 kept.
    images = root / "h5" / "images"
    (images / "000000").mkdir(parents=True)
    for sample in iter_samples(shard_tar):
        if sample.key in ATTRIBUTES:
            (images / "000000" / f"{sample.key}.jpg").write_bytes(sample.image_data)
    prompts = {}
    for stage in ("caption", "attributes phase 1", "attributes phase 2"):
        prompts[stage] = root / f"{stage.replace(' ', '_')}.txt"
        prompts[stage].write_text(f"The {stage} prompt.\n", encoding="utf-8")
    return Dataset(root, files, images, prompts)


def _llava(data: Dataset, **kwargs: Any) -> tuple[list[dict[str, Any]], str, Any]:
    settings = LlavaSettings("photos", INSTRUCTION, "vicuna_v1", str(data.images))
    out = data.root / "export" / "llava.json"
    counts = export.export_llava(
        [data.files.phase2],
        [data.images / "000000"],
        settings,
        out,
        out.with_suffix(".md"),
        **kwargs,
    )
    card = out.with_suffix(".md").read_text(encoding="utf-8")
    return json.loads(out.read_text(encoding="utf-8")), card, counts


# ---------------------------------------------------------------------------
# llava.json
# ---------------------------------------------------------------------------


def test_llava_samples_are_the_final_attributes_with_images_under_one_folder(
    dataset: Dataset,
) -> None:
    samples, card, counts = _llava(dataset)
    assert [s["id"] for s in samples] == list(ATTRIBUTES)
    assert counts.written == 3 and not counts.left_out
    for sample in samples:
        assert (dataset.images / sample["image"]).is_file()
        assert sample["image"] == f"000000/{sample['id']}.jpg"
        human, gpt = sample["conversations"]
        assert human == {"from": "human", "value": f"<image>\n{INSTRUCTION}"}
        assert gpt["from"] == "gpt"
        assert gpt["value"].split(LABEL_SEPARATOR) == ATTRIBUTES[sample["id"]]
        text = json.dumps(sample["conversations"])
        assert text.count("<image>") == 1
    # The card says which folder the images are relative to, and how trainers read it.
    assert str(dataset.images) in card
    assert "--image_folder" in card and "--version v1" in card and "sharegpt" in card
    assert "3 samples" in card


def test_llava_leaves_out_samples_by_shard_and_key(dataset: Dataset) -> None:
    left_out = {
        ("000000", "k003"): "duplicate",
        ("000000", "k001"): "leak",  # not kept anyway: not counted
        ("000001", "k004"): "duplicate",  # the same key in another shard
    }
    samples, card, counts = _llava(dataset, left_out=left_out)
    assert [s["id"] for s in samples] == ["k000", "k004"]
    assert counts.left_out == {"duplicate": 1}
    assert "Left out: 1 duplicate." in card


def test_llava_without_samples_is_an_empty_list(dataset: Dataset) -> None:
    left_out = {("000000", key): "duplicate" for key in ATTRIBUTES}
    samples, _, counts = _llava(dataset, left_out=left_out)
    assert samples == [] and counts.written == 0


def test_llava_names_a_kept_sample_without_image(dataset: Dataset) -> None:
    (dataset.images / "000000" / "k003.jpg").unlink()
    with pytest.raises(ExportError, match=r"000000: no image of sample 'k003'.*h5 job"):
        _llava(dataset)
    assert not (dataset.root / "export" / "llava.json").exists()


def test_llava_rejects_a_kept_sample_without_attributes(dataset: Dataset) -> None:
    rows = _phase_rows(2)
    rows[0]["attributes"] = []
    write_rows_parquet(dataset.files.phase2, rows, PHASE2_SCHEMA)
    with pytest.raises(ExportError, match=r"phase2.parquet: sample 'k000' is kept .*'attributes'"):
        _llava(dataset)


def test_llava_needs_folders_of_the_image_root(dataset: Dataset, tmp_path: Path) -> None:
    settings = LlavaSettings("photos", INSTRUCTION, "vicuna_v1", str(tmp_path / "elsewhere"))
    out = tmp_path / "llava.json"
    with pytest.raises(ExportError, match="not a folder of the image root"):
        export.export_llava(
            [dataset.files.phase2], [dataset.images / "000000"], settings, out, tmp_path / "c.md"
        )


def test_a_missing_parquet_column_names_file_and_column(dataset: Dataset) -> None:
    rows = [{"key": key} for key in KEYS]
    import pyarrow as pa

    write_rows_parquet(dataset.files.phase2, rows, pa.schema([("key", pa.string())]))
    with pytest.raises(ValueError, match=r"phase2.parquet: .*no column 'attributes'"):
        _llava(dataset)


# ---------------------------------------------------------------------------
# The Hugging Face dataset
# ---------------------------------------------------------------------------


def _card_info(data: Dataset, duplicates: Path | None = None) -> CardInfo:
    files = data.files
    funnel = export.funnel_total(
        [files.stats], [files.captions], [files.phase1], [files.phase2], duplicates=duplicates
    )
    source = {"url_list": "data/t.tsv", "key_column": "key"}
    return CardInfo(
        "photos", source, data.prompts, funnel, llava="results/export/photos/llava.json"
    )


def test_hf_dataset_loads_with_the_final_rows_and_a_card(dataset: Dataset) -> None:
    import datasets

    out = dataset.root / "export" / "hf"
    counts = export.export_hf([dataset.files], _card_info(dataset), out)
    assert counts.written == 3
    loaded = datasets.load_from_disk(str(out))
    assert loaded.column_names == list(export.HF_COLUMNS)
    assert isinstance(loaded.features["image"], datasets.Image)
    samples = {s.key: s for s in iter_samples(dataset.files.tar)}
    rows = loaded.cast_column("image", datasets.Image(decode=False)).to_list()
    assert [row["key"] for row in rows] == list(ATTRIBUTES)
    for row in rows:
        sample = samples[row["key"]]
        assert row["attributes"] == ATTRIBUTES[row["key"]]
        assert row["image"]["bytes"] == sample.image_data
        assert row["web_caption"] == sample.web_caption
        assert row["vlm_caption"] == f"a square, {row['key']}"
        assert row["url"] == f"file:///x/{row['key']}.jpg"
        assert (row["source"], row["shard"]) == ("url_list:data/t.tsv", "000000")
        assert (row["caption_model"], row["phase2_model"]) == (VLM, LLM)
        assert row["caption_engine"] == row["phase1_engine"] == ENGINE
    assert loaded[0]["image"].size == (40, 30)  # decoded to PIL
    # Nothing is left beside the target: no temporary folder, no cache.
    assert [p.name for p in out.parent.iterdir()] == ["hf"]


def test_hf_card_names_sources_models_with_revisions_prompts_counts_and_licence(
    dataset: Dataset,
) -> None:
    duplicates = dataset.root / "duplicates.tsv"
    row = {"key": "k004", "shard": "000000", "reason": "duplicate", "detail": "url of 000000/k0"}
    write_duplicates([row], duplicates)
    out = dataset.root / "export" / "hf"
    card_info = _card_info(dataset, duplicates)
    export.export_hf([dataset.files], card_info, out, left_out=read_duplicates(duplicates))
    card = (out / "README.md").read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["license"] == "other" and metadata["size_categories"] == ["n<1K"]
    assert "url_list: data/t.tsv" in body and "`url_list:data/t.tsv`" in body
    for revision in ("a" * 40, "b" * 40):
        assert f"`{revision}`" in body
    assert "| caption | `org/vlm` |" in body and "| attributes phase 2 | `org/llm` |" in body
    assert ENGINE in body
    for path in dataset.prompts.values():
        text = path.read_text(encoding="utf-8").strip()
        assert text in body and prompt_id(text) in body and str(path) in body
    # The funnel's counts: 6 rows, 5 downloaded, 4 captioned, 3 after each phase.
    for stage, count in [
        ("rows", 6),
        ("downloaded", 5),
        ("captioned", 4),
        ("phase 2 attributes", 3),
        ("distinct (exported, evaluated)", 2),
        ("left out: duplicate", 1),
    ]:
        assert f"| {stage} | {count} |" in body
    assert "| **in this dataset** | **2** |" in body
    assert "| duplicates and leaks | duplicate | 1 |" in body
    assert "| ingest | http_status | 1 |" in body and "| caption | caption_error | 1 |" in body
    assert "keep their owners' licences" in body
    assert "results/export/photos/llava.json" in body


def test_hf_dataset_leaves_out_samples_by_shard_and_key(dataset: Dataset) -> None:
    import datasets

    out = dataset.root / "hf"
    left_out = {("000000", "k000"): "leak", ("000002", "k003"): "duplicate"}
    counts = export.export_hf([dataset.files], _card_info(dataset), out, left_out=left_out)
    assert counts.left_out == {"leak": 1}
    assert datasets.load_from_disk(str(out))["key"] == ["k003", "k004"]


def test_hf_error_names_the_file_and_key_and_leaves_no_folder(dataset: Dataset) -> None:
    card = _card_info(dataset)  # the funnel would refuse the shortened file
    write_rows_parquet(dataset.files.captions, _caption_rows()[:3], CAPTION_SCHEMA)
    out = dataset.root / "export" / "hf"
    with pytest.raises(ExportError, match=r"captions.parquet: no row for sample 'k003'"):
        export.export_hf([dataset.files], card, out)
    assert list(out.parent.iterdir()) == []


def test_hf_names_kept_samples_missing_from_the_shard(dataset: Dataset, tmp_path: Path) -> None:
    import webdataset as wds

    tar = tmp_path / "short.tar"
    with wds.TarWriter(str(tar)) as writer:
        key = "k000"
        writer.write(
            {"__key__": key, "jpg": make_image(8, 8, (1, 2, 3))} | {"txt": "x", "json": "{}"}
        )
    files = ShardFiles(tar, *list(vars(dataset.files).values())[1:])
    with pytest.raises(ExportError, match=r"short.tar: 2 samples .* are not in the shard"):
        export.export_hf([files], _card_info(dataset), tmp_path / "hf")


def test_shard_files_needs_one_file_per_shard_of_each_stage() -> None:
    with pytest.raises(ExportError, match="1 tars, 2 stats"):
        export.shard_files(["a.tar"], ["a", "b"], ["c"], ["d"], ["e"])
