"""Ingest stage: download the images of a URL list into WebDataset shards.

A URL list (.tsv, .csv, .parquet or .jsonl; one file, or a folder or glob of parts) is cut
into fixed row ranges ("shards"), each within one part. Each shard
becomes one tar with ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per downloaded image,
plus a stats json that accounts for every input row: either it is in the tar ("ok") or it
is listed under ``failures`` with a reason.

Conventions worth knowing:

* Cells are read as strings; an empty CSV/TSV cell, a parquet null and a missing or null
  JSON Lines field all become ``None``. A JSON Lines file's columns are the fields of its
  first record (as a CSV header); fields only later records have are kept as extras.
* TSV files are read without quote handling (captions often contain stray ``"``); a TSV
  field therefore cannot contain a tab or a newline. CSV files use standard CSV quoting.
* ``file:relative/path.jpg`` URLs are resolved against the URL list's folder.
* Keys contain only ``[A-Za-z0-9_-]``: a ``.`` would be taken by WebDataset as the start of
  the file extension and split a sample, so dots are replaced too.
* Extra columns are copied into ``{key}.json``; an extra column whose name clashes with a
  field written by this stage (``key``, ``width``, ...) is stored as ``src_<name>``.

The subpackage, in the order a row goes through it: ``lists`` (URL lists), ``parts``
(lists in parts, and the manifests planning reads instead of the lists), ``source``
(the Source base class), ``sources`` (URL lists as a source; every kind from the config)
and ``collections`` (image folders, COCO, HF datasets, tars), ``jobs`` (one per row),
``fetch`` (downloads, with ``deadlines``), ``images`` (decode, ``resize``, encode) and
``writer`` (the shard's tar and stats). Its public interface is what this module imports.
"""

from vlmflow.stages.ingest.jobs import Job, plan_jobs
from vlmflow.stages.ingest.lists import (
    cell,
    count_rows,
    read_rows,
    resolve_url,
    rows_digest,
    sanitize_key,
    scan_shards,
    shard_ranges,
)
from vlmflow.stages.ingest.parts import list_parts, split_shard_id
from vlmflow.stages.ingest.settings import (
    RESERVED_FIELDS,
    Failure,
    IngestError,
    IngestSettings,
)
from vlmflow.stages.ingest.source import SOURCE_KINDS, Source
from vlmflow.stages.ingest.sources import (
    UrlListSource,
    ingest_shard,
    ingest_source_shard,
    source_from_config,
)
from vlmflow.stages.ingest.writer import write_shard, write_tar_sample

__all__ = [
    "RESERVED_FIELDS",
    "SOURCE_KINDS",
    "Failure",
    "IngestError",
    "IngestSettings",
    "Job",
    "Source",
    "UrlListSource",
    "cell",
    "count_rows",
    "ingest_shard",
    "ingest_source_shard",
    "list_parts",
    "plan_jobs",
    "read_rows",
    "resolve_url",
    "rows_digest",
    "sanitize_key",
    "scan_shards",
    "shard_ranges",
    "source_from_config",
    "split_shard_id",
    "write_shard",
    "write_tar_sample",
]
