"""Tests for vlmflow.stages.ingest.sources: image folders, captions tables, COCO, HF
datasets, tars."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import webdataset as wds
from PIL import Image

from vlmflow.core.shards import iter_samples
from vlmflow.stages.ingest import IngestError, IngestSettings
from vlmflow.stages.ingest.collections import (
    CocoSource,
    HFDatasetSource,
    ImageFolderSource,
    WebDatasetSource,
    join_captions,
)
from vlmflow.stages.ingest.source import Source
from vlmflow.stages.ingest.sources import UrlListSource as UrlList
from vlmflow.stages.ingest.sources import ingest_source_shard, source_from_config

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def ingest_all(
    source: Source, out: Path, settings: IngestSettings | None = None, shard: int = 0
) -> dict[str, Any]:
    """Ingest one shard of ``source`` (shard_size 1000) and check it loses nothing."""
    start, end = source.shard_ranges(1000)[shard]
    stats = ingest_source_shard(
        source, start, end, settings or IngestSettings(), out / "s.tar", out / "s.json", "s"
    )
    samples = list(iter_samples(out / "s.tar"))
    assert stats["rows_in"] == end - start == stats["ok"] + sum(stats["failed"].values())
    assert len(samples) == stats["ok"]
    return stats


def samples_by_key(tar: Path) -> dict[str, Any]:
    return {sample.key: sample for sample in iter_samples(tar)}


def failures(stats: dict[str, Any]) -> dict[str | None, str]:
    return {f["key"]: f["reason"] for f in stats["failures"]}


# --------------------------------------------------------------------------- image folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpg(RED))
    (root / "a.txt").write_text("ein rotes Quadrat, 赤 \u2013 «rot»\n", encoding="utf-8")
    (root / "a.png").write_bytes(png(GREEN))  # same key "a" as a.jpg
    (root / "b" / "c d.PNG").write_bytes(png(BLUE))
    (root / "b" / "c d.txt").write_text("", encoding="utf-8")  # an empty caption
    (root / "b" / "e.jpg").write_bytes(jpg(GREEN))  # no caption file at all
    (root / "b" / "notes.jpg").write_text("not an image", encoding="utf-8")
    (root / "readme.md").write_text("not listed", encoding="utf-8")
    (root / ".hidden.jpg").write_bytes(jpg(RED))
    return root


def test_image_folder_captions_beside_images(tmp_path: Path, folder: Path) -> None:
    source = ImageFolderSource(folder)
    assert source.count() == 5  # a.jpg a.png b/c d.PNG b/e.jpg b/notes.jpg
    stats = ingest_all(source, tmp_path)
    assert failures(stats) == {"a": "duplicate", "b_notes": "not_image"}
    samples = samples_by_key(tmp_path / "s.tar")
    assert list(samples) == ["a", "b_c_d", "b_e"]  # sorted by path
    assert samples["a"].web_caption == "ein rotes Quadrat, 赤 \u2013 «rot»"
    assert samples["b_c_d"].web_caption == "" and samples["b_e"].web_caption == ""
    assert samples["b_c_d"].meta["path"] == "b/c d.PNG"
    assert samples["a"].image().getpixel((5, 5))[0] > 200


def test_image_folder_digest_sees_only_its_shard(folder: Path) -> None:
    before = ImageFolderSource(folder)
    first = before.digest(0, 2)
    # A new image sorting after the others: the first shard's rows are unchanged.
    (folder / "z.jpg").write_bytes(jpg(RED))
    after = ImageFolderSource(folder)
    assert after.count() == 6
    assert after.digest(0, 2) == first
    (folder / "a.txt").write_text("a different caption", encoding="utf-8")
    assert ImageFolderSource(folder).digest(0, 2) != first


def test_missing_image_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="nowhere: image folder not found"):
        source_from_config({"image_folder": str(tmp_path / "nowhere")})


def test_captions_table_with_image_root(tmp_path: Path, folder: Path) -> None:
    table = tmp_path / "captions.csv"
    table.write_text(
        "file,caption\na.jpg,red\nb/c d.PNG,blue\nb/missing.jpg,gone\n", encoding="utf-8"
    )
    source = source_from_config(
        {"url_list": str(table), "image_root": str(folder), "url_column": "file"}
    )
    assert isinstance(source, UrlList)
    settings = IngestSettings(url_column="file")
    stats = ingest_all(source, tmp_path / "out", settings)
    assert [f["reason"] for f in stats["failures"]] == ["missing_file"]
    captions = sorted(s.web_caption for s in iter_samples(tmp_path / "out" / "s.tar"))
    assert captions == ["blue", "red"]


# --------------------------------------------------------------------------- COCO


def write_coco(path: Path, images: list[dict[str, Any]], annotations: list[Any]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def test_coco_one_sample_per_image_captions_joined(tmp_path: Path) -> None:
    image_dir = tmp_path / "train2017"
    image_dir.mkdir()
    (image_dir / "000000000009.jpg").write_bytes(jpg(RED))
    (image_dir / "000000000025.jpg").write_bytes(jpg(GREEN))
    annotations = write_coco(
        tmp_path / "captions.json",
        [
            {"id": 9, "file_name": "000000000009.jpg", "width": 40, "height": 30},
            {"id": 25, "file_name": "000000000025.jpg", "coco_url": "http://x/25.jpg"},
            {"id": 30, "file_name": "000000000030.jpg"},  # file missing
            {"id": 31, "file_name": "000000000025.jpg"},  # same file, another id
        ],
        [
            {"id": 1, "image_id": 9, "caption": "A red  square"},
            {"id": 2, "image_id": 25, "caption": "a green field."},
            {"id": 3, "image_id": 9, "caption": "something red!"},
            {"id": 4, "image_id": 30, "caption": "lost"},
        ],
    )
    source = source_from_config(
        {"coco": {"annotations": str(annotations), "images": str(image_dir)}}
    )
    assert isinstance(source, CocoSource) and source.count() == 4
    stats = ingest_all(source, tmp_path / "out")
    assert failures(stats) == {"30": "missing_file"}
    samples = samples_by_key(tmp_path / "out" / "s.tar")
    assert list(samples) == ["9", "25", "31"]
    assert samples["9"].web_caption == "A red square. something red!"
    assert samples["9"].meta["captions"] == ["A red  square", "something red!"]
    assert samples["9"].meta["src_width"] == 40  # COCO's own field, kept beside ours
    assert samples["25"].meta["coco_url"] == "http://x/25.jpg"
    assert samples["31"].web_caption == ""  # an image without captions is still a sample


@pytest.mark.parametrize(
    ("images", "annotations", "message"),
    [
        ([{"file_name": "a.jpg"}], [], r"images\[0\]: field 'id'"),
        (
            [{"id": 1, "file_name": "a.jpg"}],
            [{"image_id": 2, "caption": "x"}],
            r"annotations\[0\]: field 'image_id' 2 names no image",
        ),
        (
            [{"id": 1, "file_name": "a.jpg"}],
            [{"image_id": 1}],
            r"annotations\[0\]: field 'caption'",
        ),
        (
            [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
            [],
            r"images\[1\]: id 1 appears twice",
        ),
    ],
)
def test_bad_coco_file_names_entry_and_field(
    tmp_path: Path, images: list[Any], annotations: list[Any], message: str
) -> None:
    path = write_coco(tmp_path / "captions.json", images, annotations)
    with pytest.raises(IngestError, match=message) as error:
        CocoSource(path, tmp_path).count()
    assert str(path) in str(error.value)


def test_join_captions() -> None:
    assert join_captions([" a dog ", "Two cats?", "", "a bird."]) == "a dog. Two cats? a bird."


# --------------------------------------------------------------------------- HF datasets


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    data = {
        "new_key": ["k/1", "k2", "k3", "k2"],
        "png": [png(RED), png(GREEN), None, png(BLUE)],
        "caption": ["red", "绿色", "nothing", "blue, same key"],
        "split": ["a", "a", "b", "b"],
    }
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf"))
    config = {"hf_dataset": str(tmp_path / "hf"), "key_column": "new_key"}
    source = source_from_config(config)
    assert isinstance(source, HFDatasetSource) and source.count() == 4
    stats = ingest_all(source, tmp_path / "out")
    assert failures(stats) == {"k3": "not_image", "k2": "duplicate"}
    samples = samples_by_key(tmp_path / "out" / "s.tar")
    assert list(samples) == ["k_1", "k2"]
    assert samples["k2"].web_caption == "绿色"
    assert samples["k_1"].meta["new_key"] == "k/1" and samples["k_1"].meta["split"] == "a"
    # The digest of rows 0-1 ignores rows 2-3 and follows a changed caption.
    digest = source.digest(0, 2)
    data["caption"][3] = "changed"
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf2"))
    assert (
        source_from_config({**config, "hf_dataset": str(tmp_path / "hf2")}).digest(0, 2) == digest
    )
    data["caption"][0] = "changed"
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf3"))
    assert (
        source_from_config({**config, "hf_dataset": str(tmp_path / "hf3")}).digest(0, 2) != digest
    )


def test_hf_dataset_image_feature_and_splits(tmp_path: Path) -> None:
    features = datasets.Features({"png": datasets.Image(), "caption": datasets.Value("string")})
    split = datasets.Dataset.from_dict(
        {"png": [{"bytes": png(RED), "path": None}], "caption": ["red"]}, features=features
    )
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(IngestError, match=r"DatasetDict; set split to one of \['train'\]"):
        HFDatasetSource(tmp_path / "hf").count()
    source = HFDatasetSource(tmp_path / "hf", split="train")
    stats = ingest_all(source, tmp_path / "out")
    assert stats["ok"] == 1
    [sample] = iter_samples(tmp_path / "out" / "s.tar")
    assert sample.web_caption == "red" and len(sample.key) == 16  # sha1 of the bytes
    assert source.digest(0, 1) == HFDatasetSource(tmp_path / "hf", split="train").digest(0, 1)
    with pytest.raises(IngestError, match="column 'image' \\(image_column\\) not found"):
        HFDatasetSource(tmp_path / "hf", split="train", image_column="image").count()


# --------------------------------------------------------------------------- WebDataset


def write_tar(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.fixture
def tars(tmp_path: Path) -> list[Path]:
    first = write_tar(
        tmp_path / "in-000.tar",
        [
            {"__key__": "s/0", "jpg": jpg(RED), "txt": b"red", "json": b'{"width": 1, "x": 2}'},
            {"__key__": "s/1", "png": png(GREEN), "txt": "grün".encode()},
            {"__key__": "s/2", "txt": b"no image"},
        ],
    )
    second = write_tar(
        tmp_path / "in-001.tar",
        [
            {"__key__": "t0", "webp": _webp(BLUE), "txt": b"blue"},
            {"__key__": "t1", "jpg": jpg(RED), "txt": b"\xff\xfe bad utf-8"},
        ],
    )
    return [first, second]


def _webp(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="WEBP")
    return buffer.getvalue()


def test_webdataset_tars_one_shard_each(tmp_path: Path, tars: list[Path]) -> None:
    source = source_from_config({"webdataset": str(tmp_path / "in-*.tar")})
    assert isinstance(source, WebDatasetSource)
    assert source.shard_ranges(2) == [(0, 3), (3, 5)]  # per tar, shard_size ignored
    stats = ingest_all(source, tmp_path / "a")
    assert failures(stats) == {"s_2": "not_image"}
    samples = samples_by_key(tmp_path / "a" / "s.tar")
    assert list(samples) == ["s_0", "s_1"]
    assert samples["s_0"].meta["src_width"] == 1 and samples["s_0"].meta["x"] == 2
    assert samples["s_1"].web_caption == "grün"
    assert samples["s_1"].meta["source_key"] == "s/1"
    stats = ingest_all(source, tmp_path / "b", shard=1)
    assert failures(stats) == {"t1": "decode_error"}
    assert [s.web_caption for s in iter_samples(tmp_path / "b" / "s.tar")] == ["blue"]


def test_webdataset_reshard(tmp_path: Path, tars: list[Path]) -> None:
    source = source_from_config({"webdataset": [str(t) for t in tars], "reshard": True})
    assert source.shard_ranges(2) == [(0, 2), (2, 4), (4, 5)]
    start, end = 2, 4  # spans both tars
    stats = ingest_source_shard(
        source, start, end, IngestSettings(), tmp_path / "s.tar", tmp_path / "s.json", "s"
    )
    assert failures(stats) == {"s_2": "not_image"}
    assert [s.key for s in iter_samples(tmp_path / "s.tar")] == ["t0"]
    # The second tar's digest part does not touch the first shard.
    digest = source.digest(0, 2)
    shutil.copy(tars[0], tars[1])
    assert (
        source_from_config({"webdataset": [str(t) for t in tars], "reshard": True}).digest(0, 2)
        == digest
    )


def test_bad_webdataset_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="matches no tar file"):
        source_from_config({"webdataset": str(tmp_path / "none-*.tar")})
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(IngestError, match=r"broken\.tar: not a readable tar"):
        source_from_config({"webdataset": str(broken)}).count()


def test_exactly_one_source_per_dataset(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="exactly one of"):
        source_from_config({"url_list": "a.tsv", "image_folder": "x"}, "mixed")
    with pytest.raises(IngestError, match="found none"):
        source_from_config({"shard_size": 3})
