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

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmflow.stages.ingest.collections import (
    CocoSource,
    HFDatasetSource,
    ImageFolderSource,
    WebDatasetSource,
)
from vlmflow.stages.ingest.jobs import Job, plan_jobs
from vlmflow.stages.ingest.lists import (
    ListChangedError,
    ShardScan,
    check_columns,
    count_rows,
    read_rows,
    read_shard,
    rows_digest,
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
from vlmflow.stages.ingest.settings import IngestError, IngestSettings
from vlmflow.stages.ingest.source import (
    SOURCE_KINDS,
    Source,
)
from vlmflow.stages.ingest.writer import write_shard


def _is_current(path: Path, part: Path, shard_size: int) -> bool:
    found = read_manifest(path)
    return found is not None and found.is_current(part, shard_size)


# --------------------------------------------------------------------------- image folder


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
