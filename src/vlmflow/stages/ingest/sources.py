"""Where a dataset's samples come from, and how they are cut into shards.

Each dataset in the config names exactly one source:

* ``url_list``: a .tsv/.csv/.parquet/.jsonl list of image URLs (see vlmflow.stages.ingest.lists);
  with ``image_root``, the URL column may hold plain paths under that folder, which makes
  it the captions table of a local image folder.
* ``image_folder``: images (any depth) with their captions beside them in ``NAME.txt``.
* ``coco``: a COCO captions json (``images`` + ``annotations``) and its image folder;
  one sample per image, its captions joined.
* ``hf_dataset``: a Hugging Face ``datasets`` folder written by ``save_to_disk``, with
  the image bytes in a column (``image_column``, default ``png``).
* ``webdataset``: existing WebDataset tars (paths or globs); each tar becomes one shard
  unless ``reshard`` is set, then they are cut into ``shard_size`` samples.

Every source is a sequence of rows with a fixed order; a shard is a range of rows, and a
shard's digest (a rule param) covers only its rows, so that adding data at the end does
not make earlier shards stale. Every row becomes one ingest job: a sample in the shard or
a counted failure.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.stages.ingest.jobs import Job, plan_jobs
from vlmflow.stages.ingest.lists import (
    ListChangedError,
    ShardScan,
    cell,
    check_columns,
    count_rows,
    read_rows,
    read_shard,
    rows_digest,
    sanitize_key,
    shard_ranges,
)
from vlmflow.stages.ingest.parts import (
    SINGLE,
    Manifest,
    Part,
    build_manifests,
    list_parts,
    manifest_for,
    read_manifest,
    split_shard_id,
)
from vlmflow.stages.ingest.settings import RESERVED_FIELDS, Failure, IngestError, IngestSettings
from vlmflow.stages.ingest.writer import write_shard

SOURCE_KINDS = ("url_list", "image_folder", "coco", "hf_dataset", "webdataset")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# WebDataset member extensions that hold the image, in order of preference.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# WebDataset's key convention: the member name up to the first dot of its base name.
_TAR_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_state(path: Path) -> list[int] | None:
    """Size and mtime: a cheap stand-in for a file's content in shard digests."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _extras(fields: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    """Source fields kept in {key}.json; names this stage writes itself get a prefix."""
    return {
        (f"src_{name}" if name in RESERVED_FIELDS else name): value
        for name, value in fields.items()
        if name not in skip
    }


class Source(ABC):
    """A dataset's rows in a fixed order; see the module docstring."""

    kind: str

    @abstractmethod
    def count(self) -> int:
        """Number of rows."""

    def shard_ranges(self, shard_size: int) -> list[tuple[int, int]]:
        return shard_ranges(self.count(), shard_size)

    @abstractmethod
    def digest(self, start: int, end: int) -> str:
        """Changes when rows [start, end) change; independent of other rows."""

    @abstractmethod
    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        """One ingest job per row in [start, end), in row order."""

    @abstractmethod
    def inputs(self) -> list[str]:
        """The files/folders the source reads (Snakemake inputs of the ingest rule)."""

    def describe(self) -> str:
        return f"{self.kind}:{self.inputs()[0]}"

    # Shards by id: NNNNNN, shard n being rows [n * shard_size, ...) (a source in parts
    # overrides these).

    def shard_ids(self, shard_size: int) -> list[str]:
        return [f"{number:06d}" for number in range(len(self._ranges(shard_size)))]

    def _ranges(self, shard_size: int) -> list[tuple[int, int]]:
        memo = self._shard_ranges_by_size
        if shard_size not in memo:
            memo[shard_size] = self.shard_ranges(shard_size)
        return memo[shard_size]

    @functools.cached_property
    def _shard_ranges_by_size(self) -> dict[int, list[tuple[int, int]]]:
        return {}

    def shard_rows(self, shard: str, shard_size: int) -> dict[str, Any]:
        """A shard's params: its row range and the digest of its rows."""
        ranges = self._ranges(shard_size)
        tag, number = split_shard_id(shard)
        if tag is not None or number >= len(ranges):
            raise IngestError(f"{self.describe()}: no shard {shard} ({len(ranges)} shards)")
        start, end = ranges[number]
        return {"start": start, "end": end, "digest": self.digest(start, end)}

    def shard_inputs(self, shard: str) -> list[str]:
        """The files a shard reads (the ingest rule's inputs)."""
        return self.inputs()

    def shard_jobs(
        self, shard: str, rows: dict[str, Any], settings: IngestSettings
    ) -> tuple[str, list[Job]]:
        """(where the rows come from, their jobs) of ``shard``, planned with ``rows``."""
        return self.describe(), self.jobs(rows["start"], rows["end"], settings)

    def removed_parts(self) -> list[str]:
        """Parts of the source that earlier plans had and it no longer has."""
        return []


def _check_range(name: str, start: int, end: int, n_rows: int) -> None:
    if not 0 <= start <= end <= n_rows:
        raise IngestError(
            f"{name}: rows [{start}, {end}) requested but it has {n_rows} "
            "(did the source shrink since shards were planned?)"
        )


def _dedupe(jobs: list[Job]) -> list[Job]:
    """Mark later rows with an already seen key as duplicates (counted, not ingested)."""
    seen: dict[str, int] = {}
    marked = []
    for job in jobs:
        key = job.key
        if job.failure is None and key is not None:
            if key in seen:
                failure = Failure("duplicate", f"same key as row {seen[key]}")
                job = Job(job.row, key, job.url, job.caption, job.extra, failure)
            else:
                seen[key] = job.row
        marked.append(job)
    return marked


# --------------------------------------------------------------------------- URL list


@dataclass(frozen=True)
class UrlListSource(Source):
    """A URL list: one file, or a folder or glob of parts (vlmflow.stages.ingest.parts).

    ``manifests``: the folder of its part manifests (None: made in memory each time);
    ``build``: whether a missing or stale manifest may be made here (the workflow's main
    process) or is an error (a job: it must not read the whole list);
    ``required``: (config key, column) pairs every part must have.
    """

    path: Path
    image_root: Path | None = None
    manifests: Path | None = None
    build: bool = True
    required: tuple[tuple[str, str | None], ...] = ()
    kind = "url_list"

    @functools.cached_property
    def parts(self) -> list[Part]:
        return list_parts(self.path)

    @property
    def multipart(self) -> bool:
        return self.parts[0].tag is not None

    def _single(self) -> Path:
        if self.multipart:
            raise IngestError(f"{self.path}: a list in parts is read by shard id, not by rows")
        return self.parts[0].path

    def count(self) -> int:
        return sum(count_rows(part.path) for part in self.parts)

    def digest(self, start: int, end: int) -> str:
        return rows_digest(self._single(), start, end)

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        path = self._single()
        rows = read_rows(path, start, end, settings)
        return plan_jobs(path, rows, start, settings, self.image_root)

    def inputs(self) -> list[str]:
        return [str(part.path) for part in self.parts]

    # Shards: every id and digest from the manifests (planning); one shard's line alone
    # (a job).

    def _manifest_path(self, part: Part) -> Path | None:
        return self.manifests / part.manifest_name if self.manifests else None

    def _manifest(self, part: Part, shard_size: int, whole: bool = False) -> Manifest:
        manifest = manifest_for(part.path, shard_size, self._manifest_path(part), self.build, whole)
        check_columns(part.path, manifest.columns, dict(self.required))
        return manifest

    def _plan(self, shard_size: int) -> dict[str, tuple[Part, ShardScan]]:
        """Every shard: its part and line; stale manifests are made first, in parallel."""
        plans = self._plans
        if shard_size not in plans:
            if self.build and self.manifests is not None:
                stale = [
                    (part.path, path)
                    for part in self.parts
                    if (path := self._manifest_path(part)) is not None
                    and not _is_current(path, part.path, shard_size)
                ]
                build_manifests(stale, shard_size)
            plans[shard_size] = {
                part.shard_id(number): (part, scan)
                for part in self.parts
                for number, scan in enumerate(self._manifest(part, shard_size, True).shards())
            }
        return plans[shard_size]

    @functools.cached_property
    def _plans(self) -> dict[int, dict[str, tuple[Part, ShardScan]]]:
        return {}

    def shard_ids(self, shard_size: int) -> list[str]:
        return list(self._plan(shard_size))

    def _shard(self, shard: str, shard_size: int) -> tuple[Part, ShardScan]:
        if shard_size in self._plans:
            if shard not in self._plans[shard_size]:
                raise IngestError(f"{self.path}: no shard {shard}")
            return self._plans[shard_size][shard]
        tag, number = split_shard_id(shard)
        part = self._part(tag)
        return part, self._manifest(part, shard_size).shard(number)

    def _part(self, tag: str | None) -> Part:
        try:
            return self._parts_by_tag[tag]
        except KeyError:
            raise IngestError(f"{self.path}: no part has the shard tag {tag!r}") from None

    @functools.cached_property
    def _parts_by_tag(self) -> dict[str | None, Part]:
        return {part.tag: part for part in self.parts}

    def shard_rows(self, shard: str, shard_size: int) -> dict[str, Any]:
        part, scan = self._shard(shard, shard_size)
        rows = {"start": scan.start, "end": scan.end, "digest": scan.digest}
        return {"part": part.path.name, **rows} if part.tag else rows

    def shard_inputs(self, shard: str) -> list[str]:
        return [str(self._part(split_shard_id(shard)[0]).path)]

    def shard_jobs(
        self, shard: str, rows: dict[str, Any], settings: IngestSettings
    ) -> tuple[str, list[Job]]:
        """The jobs of ``shard`` as planned (``rows``: its params), read from the byte
        offset in its manifest; rows that changed since they were planned are an error."""
        tag, number = split_shard_id(shard)
        part = self._part(tag)
        planned = ShardScan(rows["start"], rows["end"], -1, rows["digest"])
        path = self._manifest_path(part)
        manifest = read_manifest(path) if path is not None else None
        if manifest is not None and number < manifest.shard_count:
            line = manifest.shard(number)
            if (line.start, line.end, line.digest) == (planned.start, planned.end, planned.digest):
                planned = line
        try:
            found = read_shard(part.path, planned, settings)
        except ListChangedError as exc:
            if manifest is None:
                raise
            # Edited in place with the same size and mtime: the manifest looks current.
            raise ListChangedError(f"{exc} after deleting {path}") from None
        jobs = plan_jobs(part.path, found, planned.start, settings, self.image_root)
        return f"{self.kind}:{part.path}", jobs

    def removed_parts(self) -> list[str]:
        """Parts whose manifest is here but which the list no longer has."""
        if self.manifests is None or not self.multipart or not self.manifests.is_dir():
            return []
        names = {part.manifest_name for part in self.parts}
        gone = []
        for path in sorted(self.manifests.glob("*.tsv")):
            if path.name not in names and path.stem != SINGLE:
                manifest = read_manifest(path)
                if manifest is not None:
                    gone.append(
                        f"part {manifest.fields['part']} ({manifest.shard_count} shards, "
                        f"{path.stem}_NNNNNN) is no longer in the list"
                    )
        return gone


def _is_current(path: Path, part: Path, shard_size: int) -> bool:
    found = read_manifest(path)
    return found is not None and found.is_current(part, shard_size)


# --------------------------------------------------------------------------- image folder


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
        _check_range(str(self.root), start, end, len(images))
        return images[start:end]

    def digest(self, start: int, end: int) -> str:
        states = [
            [rel, _file_state(self.root / rel), _file_state(self._caption_path(rel))]
            for rel in self._slice(start, end)
        ]
        return _digest(states)

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
        return _dedupe(jobs)

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
        _check_range(str(self.annotations), start, end, len(rows))
        return rows[start:end]

    def digest(self, start: int, end: int) -> str:
        return _digest(list(self._slice(start, end)))

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        for row, image in enumerate(self._slice(start, end), start=start):
            key = sanitize_key(str(image["id"]))
            url = (self.images / image["file_name"]).resolve().as_uri()
            caption = join_captions(image["captions"])
            jobs.append(Job(row, key, url, caption, _extras(image, {"id"})))
        return _dedupe(jobs)

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
        _check_range(str(self.root), start, end, self.count())
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
        return _digest([[_cells(row), n] for row, n in zip(others, lengths, strict=True)])

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        for row, record in enumerate(self._slice(start, end).to_pylist(), start=start):
            value = record[self.image_column]
            data = value.get("bytes") if isinstance(value, dict) else value
            caption = cell(record[self.caption_column]) or ""
            skip = {self.image_column, self.caption_column}
            extra = _extras(
                {name: cell(v) for name, v in record.items() if name not in skip}, set()
            )
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
        return _dedupe(jobs)

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
        _check_range("webdataset", start, end, self.count())
        for tar, lo, hi in self._offsets:
            for row in range(max(lo, start), min(hi, end)):
                yield row, tar, self._samples[tar][row - lo]

    def digest(self, start: int, end: int) -> str:
        tars = sorted({str(tar) for _, tar, _ in self._rows(start, end)})
        state = [[tar, _file_state(Path(tar))] for tar in tars]
        keys = [[row, sample.key] for row, _, sample in self._rows(start, end)]
        return _digest({"tars": state, "keys": keys})

    def jobs(self, start: int, end: int, settings: IngestSettings) -> list[Job]:
        jobs = []
        with contextlib.ExitStack() as stack:
            opened: dict[Path, tarfile.TarFile] = {}
            for row, tar_path, sample in self._rows(start, end):
                if tar_path not in opened:
                    opened[tar_path] = stack.enter_context(tarfile.open(tar_path))
                jobs.append(_tar_job(opened[tar_path], tar_path, row, sample))
        return _dedupe(jobs)

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
                extra = {**_extras(meta, {"caption"}), **extra}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Job(row, key, url, caption, extra, Failure("decode_error", f"txt/json: {exc}"))
    return Job(row, key, url, caption, extra, data=read(image_ext))


# --------------------------------------------------------------------------- config


def source_from_config(
    dataset: dict[str, Any],
    name: str = "dataset",
    manifests: str | Path | None = None,
    build: bool = True,
) -> Source:
    """The source of one ``config.datasets`` entry (exactly one source key); a URL list
    keeps its part manifests in ``manifests`` and may make them if ``build``."""
    given = [kind for kind in SOURCE_KINDS if kind in dataset]
    if len(given) != 1:
        raise IngestError(
            f"config.datasets.{name}: give exactly one of {', '.join(SOURCE_KINDS)} "
            f"(found {given or 'none'})"
        )
    kind = given[0]
    if kind == "url_list":
        root = dataset.get("image_root")
        required = tuple(
            (f"datasets.{name}.{key}", dataset.get(key, default))
            for key, default in (
                ("url_column", "url"),
                ("caption_column", "caption"),
                ("key_column", None),
            )
        )
        return UrlListSource(
            Path(dataset["url_list"]),
            Path(root) if root else None,
            Path(manifests) if manifests is not None else None,
            build,
            required,
        )
    if kind == "image_folder":
        return ImageFolderSource(Path(dataset["image_folder"]))
    if kind == "coco":
        coco = dataset["coco"]
        return CocoSource(Path(coco["annotations"]), Path(coco["images"]))
    if kind == "hf_dataset":
        return HFDatasetSource(
            Path(dataset["hf_dataset"]),
            image_column=dataset.get("image_column", "png"),
            caption_column=dataset.get("caption_column", "caption"),
            key_column=dataset.get("key_column"),
            split=dataset.get("split"),
        )
    patterns = dataset["webdataset"]
    return WebDatasetSource.from_patterns(
        [patterns] if isinstance(patterns, str) else list(patterns),
        reshard=bool(dataset.get("reshard", False)),
    )


def ingest_source_shard(
    source: Source,
    start: int,
    end: int,
    settings: IngestSettings,
    out_tar: str | Path,
    out_stats: str | Path,
    shard_id: str,
) -> dict[str, Any]:
    """Ingest rows [start, end) of a one-file source into a WebDataset tar; write the stats."""
    jobs = source.jobs(start, end, settings)
    return write_shard(jobs, source.describe(), start, end, settings, out_tar, out_stats, shard_id)


def ingest_shard(
    source: Source,
    shard: str,
    rows: dict[str, Any],
    settings: IngestSettings,
    out_tar: str | Path,
    out_stats: str | Path,
) -> dict[str, Any]:
    """Ingest the workflow's shard ``shard`` (``rows``: its params, ``Source.shard_rows``)
    into a WebDataset tar; write the stats."""
    where, jobs = source.shard_jobs(shard, rows, settings)
    return write_shard(jobs, where, rows["start"], rows["end"], settings, out_tar, out_stats, shard)
