"""The stages' output contract: where a shard's outputs are, what their failure columns
mean, and how many samples each stage received, kept and dropped, by reason.

Every stage records what became of each sample, so counting needs no image and no model:

* ingest: the shard's stats json (rows in, ``ok``, failures by reason);
* caption, attributes phase 1 and phase 2: the ``failure`` column of each shard's parquet
  (a sample that failed an earlier stage carries that failure on, and is counted at the
  stage that dropped it, once), plus phase 2's ``phase2_failure``: why a phase-2 answer
  added nothing to a sample that is kept;
* h5: the shard's json (examples written per phase, samples discarded as too long);
* duplicates.tsv: repeats across shards and leaks from train datasets.

The per-dataset steps find a dataset's shard files through its indexes (SHARD_INDEX).

The report's funnel, the exports' cards and ``vlmflow status`` all count here.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmflow.core.io import atomic_open, failure_reason, read_json

# Where each stage writes a shard's outputs (rules/*.smk write to the same places).
SHARD_OUTPUTS = {
    "shard": "results/{dataset}/shards/{shard}.tar",
    "stats": "results/{dataset}/shards/{shard}.stats.json",
    "captions": "results/{dataset}/captions/{shard}.parquet",
    "phase1": "results/{dataset}/attributes/phase1/{shard}.parquet",
    "phase2": "results/{dataset}/attributes/phase2/{shard}.parquet",
    "h5": "results/{dataset}/h5/shards/{shard}.json",
}
# The h5 job's other outputs (SHARD_OUTPUTS["h5"] is its json).
H5_FILES = {
    "phase1": "results/{dataset}/h5/phase1/{shard}.h5",
    "phase2": "results/{dataset}/h5/phase2/{shard}.h5",
    "images": "results/{dataset}/h5/images/{shard}",
}
DUPLICATES = "results/{dataset}/duplicates.tsv"
# Where planning keeps a URL list's part manifests (vlmflow.stages.ingest.parts): written by the
# workflow's main process, read by planning and by each ingest job for its own shard.
PART_MANIFESTS = "results/{dataset}/parts"

# Its columns, and why an image is listed there (vlmflow.stages.duplicates finds them).
DUPLICATE_COLUMNS = ("key", "shard", "reason", "detail")
DUPLICATE_REASONS = ("duplicate", "leak")

# A dataset's per-dataset steps read its per-shard outputs through one index file per
# per-shard job (a row per shard, a column per output): Snakemake then matches one file
# per shard and job to its producer, instead of one per shard and reader (at 100,000
# shards that matching is most of planning; benchmarks/dag_profile.py). The index's only
# input is the file in its MARKER column, which the same job writes with the others.
SHARD_INDEX = "results/{dataset}/index/{index}.tsv"
INDEXES: dict[str, dict[str, str]] = {
    "ingest": {"shard": SHARD_OUTPUTS["shard"], "stats": SHARD_OUTPUTS["stats"]},
    "captions": {"captions": SHARD_OUTPUTS["captions"]},
    "phase1": {"phase1": SHARD_OUTPUTS["phase1"]},
    "phase2": {"phase2": SHARD_OUTPUTS["phase2"]},
    "h5": {**{f"h5_{name}": path for name, path in H5_FILES.items()}, "h5": SHARD_OUTPUTS["h5"]},
}
MARKER = {
    "ingest": "stats",
    "captions": "captions",
    "phase1": "phase1",
    "phase2": "phase2",
    "h5": "h5",
}

# Why ingest leaves a row out of its shard: every one, in the column order of the
# ingest summary (vlmflow.stages.ingest counts them in each shard's stats json).
FAILURE_REASONS = (
    "malformed_row",
    "missing_key",
    "missing_url",
    "invalid_url",
    "duplicate",
    "missing_file",
    "http_status",
    "timeout",
    "connection_error",
    "too_large",
    "not_image",
    "decode_error",
    "too_small",
    "blocked",
    "robots",
)

# Stages of the funnel, in pipeline order, with the words the report uses for them.
FUNNEL_STAGES = {
    "rows": "rows",
    "downloaded": "downloaded",
    "captioned": "captioned",
    "phase1": "phase 1 attributes",
    "phase2": "phase 2 attributes",
    "h5_phase1": "in H5 (phase 1)",
    "h5_phase2": "in H5 (phase 2)",
    "distinct": "distinct (exported, evaluated)",
}
# Funnel stage -> (the stage that drops samples on the way into it, the funnel stage whose
# samples it receives): both h5 phases receive what attributes phase 2 kept.
DROPS = {
    "downloaded": ("ingest", "rows"),
    "captioned": ("caption", "downloaded"),
    "phase1": ("attributes phase 1", "captioned"),
    "phase2": ("attributes phase 2", "phase1"),
    "h5_phase1": ("h5 phase 1", "phase2"),
    "h5_phase2": ("h5 phase 2", "phase2"),
    "distinct": ("duplicates and leaks", "phase2"),
}
# Not a drop: a phase-2 answer that failed leaves the sample with its phase-1 attributes.
PHASE2_ANSWER = "phase 2 answer (sample kept)"
# The failure attribute phase 1 writes for a sample whose caption failed: it never
# reached the LLM, so it is no failure of phase 1.
CAPTION_FAILED = "caption_failed"


class ReportError(ValueError):
    """A stage output that cannot be counted: the message names the file and field."""


def read_columns(path: str | Path, columns: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Only ``columns`` of a stage's parquet, as rows; a missing column is an error."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise ReportError(f"{path}: not a readable {what} parquet: {exc}") from None
    missing = [column for column in columns if column not in names]
    if missing:
        raise ReportError(
            f"{path}: {what} parquet has no column {missing[0]!r} (columns: {', '.join(names)})"
        )
    rows: list[dict[str, Any]] = pq.read_table(path, columns=list(columns)).to_pylist()
    return rows


# --- the funnel --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardOutputs:
    """The per-shard files one shard's funnel counts; ``h5`` is None without HDF5 files."""

    stats: Path
    captions: Path
    phase1: Path
    phase2: Path
    h5: Path | None = None
    # (shard, key) -> "duplicate" / "leak" for the dataset's images (vlmflow.stages.duplicates);
    # None: not looked for.
    repeated: dict[tuple[str, str], str] | None = None


@dataclass
class Funnel:
    """Samples left after each stage, and why the others were dropped (or kept anyway)."""

    shard: str
    counts: dict[str, int | None]  # FUNNEL_STAGES key -> samples; None: stage not run
    # (stage, reason) -> samples; the stage is one of DROPS or PHASE2_ANSWER.
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)


def _ok_keys(
    rows: list[dict[str, Any]],
    previous_ok: set[str],
    expected_keys: set[str] | None,
    path: Path,
    stage: str,
    failures: Counter[tuple[str, str]],
) -> set[str]:
    """The keys a stage kept; its own failures (of samples it received) are counted."""
    keys = [row["key"] for row in rows]
    if expected_keys is not None and set(keys) != expected_keys:
        extra = sorted(set(keys) - expected_keys)
        lost = sorted(expected_keys - set(keys))
        raise ReportError(
            f"{path}: column 'key' does not match the previous stage's samples "
            f"({len(extra)} unexpected, e.g. {extra[:3]}; {len(lost)} missing, e.g. {lost[:3]})"
        )
    ok = {row["key"] for row in rows if row["failure"] is None}
    if not ok <= previous_ok:
        revived = sorted(ok - previous_ok)
        raise ReportError(
            f"{path}: column 'failure' is empty for {len(revived)} samples that failed an "
            f"earlier stage (e.g. {revived[0]!r}); is the file older than its input?"
        )
    for row in rows:
        if row["key"] in previous_ok and row["failure"] is not None:
            failures[(stage, failure_reason(row["failure"]))] += 1
    return ok


def shard_funnel(
    shard: str,
    rows_in: int,
    ingest_failed: dict[str, int],
    files: ShardOutputs,
    partial: bool = False,
) -> Funnel:
    """One shard's funnel from its ingest counts and its stage outputs.

    ``partial``: the stages whose outputs are not there yet stay None (``vlmflow status``
    during a run); otherwise a missing output is an error.
    """
    funnel = Funnel(shard=shard, counts=dict.fromkeys(FUNNEL_STAGES))
    funnel.counts["rows"] = rows_in
    downloaded = rows_in - sum(ingest_failed.values())
    funnel.counts["downloaded"] = downloaded
    for reason, count in ingest_failed.items():
        if count:
            funnel.failures[(DROPS["downloaded"][0], reason)] += count
    if partial and not files.captions.exists():
        return funnel
    kept = _attribute_stages(funnel, files, downloaded, partial)
    if kept is None:
        return funnel
    if files.repeated is not None:
        _distinct(funnel, files.repeated, kept)
    if files.h5 is not None and (files.h5.exists() or not partial):
        _h5_stages(funnel, files.h5, files.phase2, len(kept))
    return funnel


def _attribute_stages(
    funnel: Funnel, files: ShardOutputs, downloaded: int, partial: bool
) -> set[str] | None:
    """Caption, phase 1 and phase 2 of a shard; the keys phase 2 kept (None: not there)."""
    captions = read_columns(files.captions, ["key", "failure"], "caption")
    if len(captions) != downloaded:
        raise ReportError(
            f"{files.captions}: {len(captions)} rows, but {files.stats} counts "
            f"ok = {downloaded} downloaded samples; is one of them older than the other?"
        )
    all_keys = {row["key"] for row in captions}
    captioned = _ok_keys(captions, all_keys, None, files.captions, "caption", funnel.failures)
    funnel.counts["captioned"] = len(captioned)
    if partial and not files.phase1.exists():
        return None
    phase1_rows = read_columns(files.phase1, ["key", "failure"], "attributes phase 1")
    phase1 = _ok_keys(
        phase1_rows, captioned, all_keys, files.phase1, DROPS["phase1"][0], funnel.failures
    )
    funnel.counts["phase1"] = len(phase1)
    if partial and not files.phase2.exists():
        return None
    phase2_rows = read_columns(
        files.phase2, ["key", "failure", "phase2_failure"], "attributes phase 2"
    )
    phase2 = _ok_keys(
        phase2_rows, phase1, all_keys, files.phase2, DROPS["phase2"][0], funnel.failures
    )
    for row in phase2_rows:
        if row["key"] in phase2 and row["phase2_failure"] is not None:
            funnel.failures[(PHASE2_ANSWER, failure_reason(row["phase2_failure"]))] += 1
    funnel.counts["phase2"] = len(phase2)
    return phase2


def _distinct(funnel: Funnel, repeated: dict[tuple[str, str], str], kept: set[str]) -> None:
    reasons = (repeated.get((funnel.shard, key)) for key in kept)
    dropped = Counter(reason for reason in reasons if reason is not None)
    for reason, count in dropped.items():
        funnel.failures[(DROPS["distinct"][0], reason)] += count
    funnel.counts["distinct"] = len(kept) - sum(dropped.values())


def _h5_stages(funnel: Funnel, h5: Path, phase2: Path, kept: int) -> None:
    params = read_json(h5)
    for phase in ("phase1", "phase2"):
        try:
            written = int(params[phase]["n_examples"])
            too_long = int(params[phase]["discarded_too_long"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(
                f"{h5}: field {phase}.n_examples / {phase}.discarded_too_long: "
                f"expected integers ({exc!r})"
            ) from None
        if written + too_long != kept:
            raise ReportError(
                f"{h5}: {phase}.n_examples {written} + discarded_too_long "
                f"{too_long} != {kept} samples kept by {phase2}"
            )
        funnel.counts[f"h5_{phase}"] = written
        if too_long:
            funnel.failures[(DROPS[f"h5_{phase}"][0], "discarded_too_long")] += too_long


def dataset_funnel(
    stats: Sequence[str | Path],
    captions: Sequence[str | Path],
    phase1: Sequence[str | Path],
    phase2: Sequence[str | Path],
    h5: Sequence[str | Path] = (),
    duplicates: str | Path | None = None,
) -> list[Funnel]:
    """One funnel per shard; the lists are per shard, in the same order (h5 may be empty).

    ``duplicates``: the dataset's duplicates.tsv (vlmflow.stages.duplicates), if looked for.
    """
    lengths = {len(stats), len(captions), len(phase1), len(phase2)}
    if len(lengths) != 1 or (h5 and len(h5) != len(stats)):
        raise ReportError(
            f"one file per shard of each stage expected: {len(stats)} stats, "
            f"{len(captions)} captions, {len(phase1)} phase 1, {len(phase2)} phase 2, "
            f"{len(h5)} h5 files"
        )
    try:
        table = summarize_stats(list(stats))[:-1]  # without its "total" row
        repeated = read_duplicates(duplicates) if duplicates is not None else None
    except DuplicatesError as exc:
        raise ReportError(str(exc)) from None
    funnels = []
    for number, row in enumerate(table):
        reasons = _ingest_reasons(row)
        files = ShardOutputs(
            stats=Path(stats[number]),
            captions=Path(captions[number]),
            phase1=Path(phase1[number]),
            phase2=Path(phase2[number]),
            h5=Path(h5[number]) if h5 else None,
            repeated=repeated,
        )
        funnels.append(shard_funnel(str(row["shard"]), int(row["rows_in"]), reasons, files))
    return funnels


def total_funnel(funnels: Sequence[Funnel]) -> Funnel:
    """The sum over shards (a stage not run in any shard stays None)."""
    total = Funnel(shard="total", counts=dict.fromkeys(FUNNEL_STAGES))
    for stage in FUNNEL_STAGES:
        counts = [f.counts[stage] for f in funnels if f.counts[stage] is not None]
        total.counts[stage] = sum(c for c in counts if c is not None) if counts else None
    if not funnels:
        total.counts["rows"] = 0
    for funnel in funnels:
        total.failures.update(funnel.failures)
    return total


def failure_rows(total: Funnel) -> list[tuple[str, str, int, float | None]]:
    """(stage, reason, samples, % of the samples the stage received), in pipeline order."""
    received = {stage: total.counts[source] for stage, source in DROPS.values()}
    received[PHASE2_ANSWER] = total.counts["phase2"]
    order = list(received)
    rows = []
    for (stage, reason), count in sorted(
        total.failures.items(), key=lambda item: (order.index(item[0][0]), -item[1], item[0][1])
    ):
        inputs = received[stage]
        share = round(100.0 * count / inputs, 1) if inputs else None
        rows.append((stage, reason, count, share))
    return rows


def shard_counts(root: str | Path, dataset: str, shard: str) -> Funnel:
    """A shard's funnel from the outputs its stages wrote so far under ``root`` (a run's
    working directory): the stages not there yet stay None."""
    paths = {
        name: Path(root) / template.format(dataset=dataset, shard=shard)
        for name, template in SHARD_OUTPUTS.items()
    }
    [row, _total] = summarize_stats([paths["stats"]])
    files = ShardOutputs(
        stats=paths["stats"],
        captions=paths["captions"],
        phase1=paths["phase1"],
        phase2=paths["phase2"],
        h5=paths["h5"] if paths["h5"].exists() else None,
    )
    return shard_funnel(shard, int(row["rows_in"]), _ingest_reasons(row), files, partial=True)


def _ingest_reasons(row: dict[str, Any]) -> dict[str, int]:
    """The failure-reason columns of a summarize_stats row."""
    return {
        key: value for key, value in row.items() if key not in ("shard", "rows_in", "ok", "failed")
    }


def stage_samples(funnel: Funnel, stage: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """(kept, dropped by reason, kept with a failed phase-2 answer by reason) of one funnel
    stage: each sample is counted at the stage that dropped it, as the report counts."""
    dropping = DROPS[stage][0]
    dropped = {reason: n for (name, reason), n in funnel.failures.items() if name == dropping}
    noted = {}
    if stage == "phase2":
        noted = {r: n for (name, r), n in funnel.failures.items() if name == PHASE2_ANSWER}
    return funnel.counts[stage] or 0, dropped, noted


# --- ingest stats ---------------------------------------------------------------------------


def summarize_stats(stats_paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per shard plus a "total" row, with a 0-filled column per failure reason."""
    shards = [_read_stats(stats_path) for stats_path in stats_paths]
    # Known reasons always get a column (a stable table schema); unknown ones are appended.
    extra = sorted({reason for *_, by in shards for reason in by} - set(FAILURE_REASONS))
    reasons = [*FAILURE_REASONS, *extra]
    table: list[dict[str, Any]] = [
        {
            "shard": shard,
            "rows_in": rows_in,
            "ok": ok,
            "failed": sum(failed_by.values()),
            **{reason: failed_by.get(reason, 0) for reason in reasons},
        }
        for shard, rows_in, ok, failed_by in shards
    ]
    total: dict[str, Any] = {"shard": "total"}
    for column in ["rows_in", "ok", "failed", *reasons]:
        total[column] = sum(row[column] for row in table)
    return [*table, total]


def _read_stats(stats_path: str | Path) -> tuple[str, int, int, dict[str, int]]:
    """(shard, rows_in, ok, failed-by-reason) of one stats json, checked for consistency."""
    try:
        with open(stats_path, encoding="utf-8") as handle:
            stats = json.load(handle)
        shard, rows_in, ok = str(stats["shard"]), int(stats["rows_in"]), int(stats["ok"])
        failed_by = {str(reason): int(n) for reason, n in stats["failed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{stats_path}: not a readable ingest stats file: {exc!r}") from None
    if rows_in != ok + sum(failed_by.values()):
        raise ReportError(f"{stats_path}: rows_in {rows_in} != ok {ok} + failed {failed_by}")
    return shard, rows_in, ok, failed_by


# --- duplicates.tsv -----------------------------------------------------------------------


class DuplicatesError(ValueError):
    """A stats or duplicates file that cannot be used: the message names the file."""


def write_duplicates(rows: Sequence[dict[str, str]], out_tsv: str | Path) -> None:
    with atomic_open(out_tsv) as handle:
        writer = csv.DictWriter(handle, DUPLICATE_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_duplicates(path: str | Path) -> dict[tuple[str, str], str]:
    """(shard, key) -> reason (``duplicate`` or ``leak``) of a duplicates.tsv.

    By shard and key: an image repeated under the same URL has the same key (a hash of
    the URL) in both shards, and only the later one is a duplicate.
    """
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError as exc:
        raise DuplicatesError(f"{path}: cannot read: {exc}") from None
    out = {}
    for number, row in enumerate(rows, start=2):
        if row.get("reason") not in DUPLICATE_REASONS or not row.get("key") or not row.get("shard"):
            raise DuplicatesError(
                f"{path}: line {number}: expected a key, a shard and a reason in "
                f"{DUPLICATE_REASONS}, got {row}"
            )
        out[(row["shard"], row["key"])] = row["reason"]
    return out


class ShardIndexError(ValueError):
    """An index file that names a missing file, or lacks the column asked for."""


def write_shard_index(index: str, dataset: str, shards: Sequence[str], out_tsv: str | Path) -> int:
    """Write ``dataset``'s index of the outputs of per-shard job ``index`` (a key of
    INDEXES), one row per shard in ``shards`` order; every listed file must exist.
    Returns the number of rows."""
    columns = INDEXES[index]
    rows = []
    for shard in shards:
        row = {name: path.format(dataset=dataset, shard=shard) for name, path in columns.items()}
        missing = [path for path in row.values() if not Path(path).exists()]
        if missing:
            raise ShardIndexError(f"{out_tsv}: shard {shard}: {missing[0]} does not exist")
        rows.append({"shard": shard, **row})
    with atomic_open(out_tsv) as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["shard", *columns], delimiter="\t", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def read_shard_index(paths: str | Path | Sequence[str | Path], column: str) -> list[str]:
    """The files in ``column`` of one or more index files, in shard order, file by file."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            if column not in (reader.fieldnames or ()):
                raise ShardIndexError(f"{path}: no column {column!r} (has {reader.fieldnames})")
            files += [row[column] for row in reader]
    return files
