"""Image collections as sources: a folder of images (with captions beside them or in a
table), COCO captions, a Hugging Face dataset and WebDataset tars."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.stages.ingest.jobs import Job
from vlmflow.stages.ingest.lists import (
    cell,
    sanitize_key,
    shard_ranges,
)
from vlmflow.stages.ingest.settings import Failure, IngestError, IngestSettings
from vlmflow.stages.ingest.source import (
    Source,
    check_range,
    dedupe,
    extras,
    file_state,
    short_digest,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# WebDataset member extensions that hold the image, in order of preference.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# WebDataset's key convention: the member name up to the first dot of its base name.
_TAR_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _list_images(root: Path) -> tuple[str, ...]:
    """Image files under ``root`` (relative posix paths, sorted); hidden ones skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return tuple(sorted(found))


@dataclass(frozen=True)
class ImageFolderSource(Source):
    """Images under a folder, sorted by path; ``a/b.jpg``'s caption is ``a/b.txt``.

    Keys are the relative path without its suffix (sanitised): ``a/b.jpg`` -> ``a_b``.
    New images whose paths sort after the existing ones leave earlier shards as they are.
    """

    root: Path
    kind = "image_folder"

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise IngestError(f"{self.root}: image folder not found")

    @functools.cached_property
    def _images(self) -> tuple[str, ...]:
        return _list_images(self.root.resolve())

    def count(self) -> int:
        return len(self._images)

    def _slice(self, start: int, end: int) -> tuple[str, ...]:
        images = self._images
        check_range(str(self.root), start, end, len(images))
        return images[start:end]

    def digest(self, start: int, end: int) -> str:
        states = [
            [rel, file_state(self.root / rel), file_state(self._caption_path(rel))]
            for rel in self._slice(start, end)
        ]
        return short_digest(states)

    def _caption_path(self, rel: str) -> Path:
        return (self.root / rel).with_suffix(".txt")

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        for row, rel in enumerate(self._slice(start, end), start=start):
            key = sanitize_key(rel.rsplit(".", 1)[0])
            url = (self.root / rel).resolve().as_uri()
            failure = None
            caption = ""
            try:
                caption = self._caption_path(rel).read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                pass  # an image without a caption file has an empty caption
            except UnicodeDecodeError as exc:
                failure = Failure("decode_error", f"{self._caption_path(rel)}: not UTF-8: {exc}")
            jobs.append(Job(row, key, url, caption, {"path": rel}, failure))
        return dedupe(jobs)

    def inputs(self) -> list[str]:
        return [str(self.root)]


# --------------------------------------------------------------------------- COCO


def _coco_rows(path: Path) -> tuple[dict[str, Any], ...]:
    """One row per image of a COCO captions file: id, file_name, captions, other fields."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise IngestError(f"{path}: COCO annotations file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise IngestError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for field in ("images", "annotations"):
        if not isinstance(data.get(field), list):
            raise IngestError(f"{path}: field {field!r} missing or not a list")
    rows: dict[Any, dict[str, Any]] = {}
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict):
            raise IngestError(f"{where}: expected an object")
        for field, types in (("id", (int, str)), ("file_name", (str,))):
            if not isinstance(image.get(field), types) or isinstance(image.get(field), bool):
                raise IngestError(f"{where}: field {field!r} missing or not a {types[0].__name__}")
        if image["id"] in rows:
            raise IngestError(f"{where}: id {image['id']!r} appears twice")
        rows[image["id"]] = {**image, "captions": []}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise IngestError(f"{where}: expected an object")
        if annotation.get("image_id") not in rows:
            raise IngestError(
                f"{where}: field 'image_id' {annotation.get('image_id')!r} names no image"
            )
        caption = annotation.get("caption")
        if not isinstance(caption, str):
            raise IngestError(f"{where}: field 'caption' missing or not a string")
        rows[annotation["image_id"]]["captions"].append(caption)
    return tuple(rows.values())


def join_captions(captions: list[str]) -> str:
    """COCO's several captions per image as one text: each a sentence, in file order."""
    sentences = []
    for caption in captions:
        text = " ".join(caption.split())
        if text:
            sentences.append(text if text[-1] in ".!?" else f"{text}.")
    return " ".join(sentences)


@dataclass(frozen=True)
class CocoSource(Source):
    annotations: Path
    images: Path
    kind = "coco"

    def __post_init__(self) -> None:
        if not self.images.is_dir():
            raise IngestError(f"{self.images}: COCO image folder not found")

    @functools.cached_property
    def _rows(self) -> tuple[dict[str, Any], ...]:
        return _coco_rows(self.annotations)

    def count(self) -> int:
        return len(self._rows)

    def _slice(self, start: int, end: int) -> tuple[dict[str, Any], ...]:
        rows = self._rows
        check_range(str(self.annotations), start, end, len(rows))
        return rows[start:end]

    def digest(self, start: int, end: int) -> str:
        return short_digest(list(self._slice(start, end)))

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        for row, image in enumerate(self._slice(start, end), start=start):
            key = sanitize_key(str(image["id"]))
            url = (self.images / image["file_name"]).resolve().as_uri()
            caption = join_captions(image["captions"])
            jobs.append(Job(row, key, url, caption, extras(image, {"id"})))
        return dedupe(jobs)

    def inputs(self) -> list[str]:
        return [str(self.annotations), str(self.images)]


# --------------------------------------------------------------------------- HF datasets


@dataclass(frozen=True)
class HFDatasetSource(Source):
    """A ``save_to_disk`` folder; the image column holds bytes or ``{bytes, path}``."""

    root: Path
    image_column: str = "png"
    caption_column: str = "caption"
    key_column: str | None = None  # None: key = sha1 of the image bytes
    split: str | None = None  # for a DatasetDict folder
    kind = "hf_dataset"

    @functools.cached_property
    def _table(self) -> Any:
        """The dataset's Arrow table (memory-mapped, so slicing reads only those rows)."""
        # Imported here: only configs with a datasets folder pay for the import.
        import datasets

        try:
            loaded = datasets.load_from_disk(str(self.root))
        except FileNotFoundError as exc:
            raise IngestError(f"{self.root}: not a datasets folder (save_to_disk): {exc}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise IngestError(
                    f"{self.root}: a DatasetDict; set split to one of {sorted(loaded)}"
                    + (f" (not {self.split!r})" if self.split else "")
                )
            loaded = loaded[self.split]
        table = loaded.data.table if hasattr(loaded.data, "table") else loaded.data
        names = list(table.column_names)
        for field, name in (
            ("image_column", self.image_column),
            ("caption_column", self.caption_column),
            ("key_column", self.key_column),
        ):
            if name is not None and name not in names:
                raise IngestError(
                    f"{self.root}: column {name!r} ({field}) not found; columns: {names}"
                )
        return table

    def count(self) -> int:
        return int(self._table.num_rows)

    def _slice(self, start: int, end: int) -> Any:
        check_range(str(self.root), start, end, self.count())
        return self._table.slice(start, end - start)

    def digest(self, start: int, end: int) -> str:
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self._slice(start, end)
        column = table.column(self.image_column)
        if pa.types.is_struct(column.type):  # datasets.Image(): {bytes, path}
            column = pc.struct_field(column, "bytes")
        # Every other cell in full; the images by their length, which is read from the
        # Arrow offsets without touching the bytes (a digest must be cheap at parse time).
        others = table.drop_columns([self.image_column]).to_pylist()
        lengths = pc.binary_length(column).to_pylist()
        return short_digest([[_cells(row), n] for row, n in zip(others, lengths, strict=True)])

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        for row, record in enumerate(self._slice(start, end).to_pylist(), start=start):
            value = record[self.image_column]
            data = value.get("bytes") if isinstance(value, dict) else value
            caption = cell(record[self.caption_column]) or ""
            skip = {self.image_column, self.caption_column}
            extra = extras({name: cell(v) for name, v in record.items() if name not in skip}, set())
            url = f"{self.root}#{row}"
            key: str | None = None
            if self.key_column is not None:
                raw = cell(record[self.key_column])
                key = sanitize_key(raw.strip()) if raw is not None and raw.strip() else None
            elif data:
                key = hashlib.sha1(data).hexdigest()[:16]
            if self.key_column is not None and key is None:
                failure = Failure("missing_key", f"key column {self.key_column!r} is empty")
                jobs.append(Job(row, None, url, caption, extra, failure))
            elif not data:
                failure = Failure("not_image", f"column {self.image_column!r} has no bytes")
                jobs.append(Job(row, key, url, caption, extra, failure))
            else:
                jobs.append(Job(row, key, url, caption, extra, data=bytes(data)))
        return dedupe(jobs)

    def inputs(self) -> list[str]:
        return [str(self.root)]


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    return {name: cell(value) for name, value in row.items()}


# --------------------------------------------------------------------------- WebDataset


@dataclass(frozen=True)
class _TarSample:
    key: str
    members: dict[str, str]  # extension -> member name


def _tar_samples(path: Path) -> tuple[_TarSample, ...]:
    """The samples of a WebDataset tar, grouped from member names as WebDataset does.

    Read from the tar headers only (no data, no torch import), so that shards can be
    planned at parse time; the ingest job reads the same grouping.
    """
    samples: list[_TarSample] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _TAR_MEMBER.match(member.name)
                if match is None:
                    raise IngestError(
                        f"{path}: member {member.name!r} has no extension, so no sample key"
                    )
                key, ext = match.group(1), match.group(2).lower()
                if not samples or samples[-1].key != key:
                    samples.append(_TarSample(key, {}))
                if ext in samples[-1].members:
                    raise IngestError(f"{path}: sample {key!r} has two {ext!r} members")
                samples[-1].members[ext] = member.name
    except (tarfile.TarError, OSError) as exc:
        raise IngestError(f"{path}: not a readable tar: {exc}") from None
    return tuple(samples)


@dataclass(frozen=True)
class WebDatasetSource(Source):
    tars: tuple[Path, ...]
    reshard: bool = False
    kind = "webdataset"

    @classmethod
    def from_patterns(cls, patterns: list[str], reshard: bool = False) -> WebDatasetSource:
        tars: list[Path] = []
        for pattern in patterns:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches or not all(Path(m).is_file() for m in matches):
                raise IngestError(f"webdataset: {pattern!r} matches no tar file")
            tars += [Path(m) for m in matches if Path(m) not in tars]
        if not tars:
            raise IngestError("webdataset: no tar files given")
        return cls(tuple(tars), reshard)

    @functools.cached_property
    def _samples(self) -> dict[Path, tuple[_TarSample, ...]]:
        return {tar: _tar_samples(tar) for tar in self.tars}

    @functools.cached_property
    def _offsets(self) -> list[tuple[Path, int, int]]:
        """(tar, first row, end row) of every tar in the concatenated row order."""
        offsets, start = [], 0
        for tar in self.tars:
            n = len(self._samples[tar])
            offsets.append((tar, start, start + n))
            start += n
        return offsets

    def count(self) -> int:
        return self._offsets[-1][2]

    def shard_ranges(self, shard_size: int) -> list[tuple[int, int]]:
        if self.reshard:
            return shard_ranges(self.count(), shard_size)
        return [(lo, hi) for _, lo, hi in self._offsets]  # one shard per tar

    def _rows(self, start: int, end: int) -> Iterator[tuple[int, Path, _TarSample]]:
        check_range("webdataset", start, end, self.count())
        for tar, lo, hi in self._offsets:
            for row in range(max(lo, start), min(hi, end)):
                yield row, tar, self._samples[tar][row - lo]

    def digest(self, start: int, end: int) -> str:
        tars = sorted({str(tar) for _, tar, _ in self._rows(start, end)})
        state = [[tar, file_state(Path(tar))] for tar in tars]
        keys = [[row, sample.key] for row, _, sample in self._rows(start, end)]
        return short_digest({"tars": state, "keys": keys})

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        with contextlib.ExitStack() as stack:
            opened: dict[Path, tarfile.TarFile] = {}
            for row, tar_path, sample in self._rows(start, end):
                if tar_path not in opened:
                    opened[tar_path] = stack.enter_context(tarfile.open(tar_path))
                jobs.append(_tar_job(opened[tar_path], tar_path, row, sample))
        return dedupe(jobs)

    def inputs(self) -> list[str]:
        return [str(tar) for tar in self.tars]


def _tar_job(tar: tarfile.TarFile, tar_path: Path, row: int, sample: _TarSample) -> Job:
    key = sanitize_key(sample.key)
    url = f"{tar_path}#{sample.key}"

    def read(ext: str) -> bytes:
        handle = tar.extractfile(sample.members[ext])
        assert handle is not None  # regular files only, see _tar_samples
        return handle.read()

    extra: dict[str, Any] = {"source_tar": str(tar_path), "source_key": sample.key}
    image_ext = next((ext for ext in TAR_IMAGE_EXTS if ext in sample.members), None)
    if image_ext is None:
        failure = Failure("not_image", f"no image member ({', '.join(TAR_IMAGE_EXTS)})")
        return Job(row, key, url, "", extra, failure)
    caption = ""
    try:
        if "txt" in sample.members:
            caption = read("txt").decode("utf-8").strip()
        if "json" in sample.members:
            meta = json.loads(read("json"))
            if isinstance(meta, dict):
                extra = {**extras(meta, {"caption"}), **extra}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Job(row, key, url, caption, extra, Failure("decode_error", f"txt/json: {exc}"))
    return Job(row, key, url, caption, extra, data=read(image_ext))


# --------------------------------------------------------------------------- config
