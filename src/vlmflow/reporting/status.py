"""``vlmflow status``: where a run stands, per dataset and stage, at a glance.

Three sources, each the one that owns the fact:

- What is done, stale or missing, and why: Snakemake's own ``--detailed-summary`` (the
  same decision ``snakemake all`` would take: "missing", "params changed", "updated input
  files", "rule implementation changed", "set of input files changed"). A file that
  exists but whose job will run again only because an upstream job will has status "ok"
  and plan "update pending" there; its recorded input files (the detailed column) say
  which, and it is reported as "input files updated by another job", Snakemake's words in
  a dry run. ``--summary`` ignores Snakemake's incomplete markers (``.snakemake/incomplete``:
  a job started and has not finished, because it is running now or Snakemake was killed),
  so they are read here, and such outputs count as neither done nor trustworthy.
- How many samples each finished shard kept or lost: the stage outputs themselves,
  counted by vlmflow.core.contract as the report's funnel counts them (each sample once, at
  the stage that dropped it).
- Why a job failed: Snakemake's run logs (``.snakemake/log/*.snakemake.log``), whose
  "Error in rule" blocks name the job's outputs and log file. A failure counts while one
  of its outputs is still missing or incomplete: Snakemake deletes the outputs of a failed
  job, so outputs that exist again were made by a later, successful run.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.core.contract import Funnel, shard_counts, stage_samples
from vlmflow.core.stage_versions import STAGE_VERSIONS, recorded_version

# Per-shard stages in pipeline order: (rule, its funnel stage in vlmflow.core.contract, label).
SHARD_STAGES = [
    ("ingest", "downloaded", "ingest"),
    ("caption", "captioned", "caption"),
    ("attributes_phase1", "phase1", "attributes phase 1"),
    ("attributes_phase2", "phase2", "attributes phase 2"),
    ("h5", "h5_phase1", "h5 phase 1"),
    ("h5", "h5_phase2", "h5 phase 2"),
]
SHARD_RULES = {rule for rule, _, _ in SHARD_STAGES}
# Whole-run steps shown one line each.
SINGLE_STAGES = ["train_phase1", "train_phase2", "evaluate", "metrics_table"]
# results/<dataset>/<anything>/<shard>[.<ext>]
_SHARD_PATH = re.compile(r"^results/(?P<dataset>[^/]+)/(?:[^/]+/)*(?P<shard>[^/.]+)(?:\.[^/]*)?$")
UP_TO_DATE = "no update"
UPSTREAM = "input files updated by another job"
INCOMPLETE = "incomplete (its job is running, or was killed)"
PARAMS_CHANGED = "params changed"


class StatusError(Exception):
    """The folder is not a workflow, or Snakemake could not say what its state is."""


@dataclass(frozen=True)
class SummaryRow:
    """One line of ``snakemake --summary`` (``inputs`` only from ``--detailed-summary``)."""

    output: str
    date: str
    rule: str
    log: str
    status: str
    plan: str
    inputs: tuple[str, ...] = ()

    @property
    def exists(self) -> bool:
        return self.date != "-"

    @property
    def up_to_date(self) -> bool:
        return self.exists and self.plan == UP_TO_DATE


@dataclass
class StageStatus:
    dataset: str
    stage: str
    rule: str
    shards_total: int = 0
    shards_done: int = 0
    shards_stale: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    # Phase 2 only: samples kept with their phase-1 attributes because the phase-2 answer
    # failed (the phase2_failure column), counted in samples_ok, by reason.
    phase1_only: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FailedJob:
    rule: str
    outputs: list[str]
    log: str
    last_error: str


@dataclass(frozen=True)
class ShardSamples:
    """Samples of one finished shard of a stage."""

    ok: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    phase1_only: dict[str, int] = field(default_factory=dict)


@dataclass
class Status:
    workdir: str
    stages: list[StageStatus]
    singles: list[dict[str, str]]
    stale: dict[str, dict[str, list[str]]]  # rule -> reason -> outputs
    failed: list[FailedJob]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Snakemake's summary and incomplete markers
# ---------------------------------------------------------------------------


def parse_summary(text: str) -> list[SummaryRow]:
    """The rows of ``snakemake --summary`` or ``--detailed-summary`` (tab-separated,
    with a header line; other lines Snakemake prints around it are skipped)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if line.startswith("output_file\t")), None)
    if header_at is None:
        raise StatusError("snakemake --summary printed no table (no 'output_file' header)")
    header = lines[header_at].split("\t")
    wanted = ["output_file", "date", "rule", "log-file(s)", "status", "plan"]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise StatusError(f"snakemake --summary table lacks columns {missing}: {header}")
    at = {name: header.index(name) for name in [*wanted, "input-file(s)"] if name in header}
    rows = []
    for line in lines[header_at + 1 :]:
        cells = line.split("\t")
        if len(cells) != len(header):
            continue  # a warning line Snakemake printed among the rows
        inputs = cells[at["input-file(s)"]] if "input-file(s)" in at else "-"
        rows.append(
            SummaryRow(
                output=cells[at["output_file"]],
                date=cells[at["date"]],
                rule=cells[at["rule"]],
                log=cells[at["log-file(s)"]],
                status=cells[at["status"]],
                plan=cells[at["plan"]],
                inputs=tuple(p for p in inputs.split(",") if p and inputs != "-"),
            )
        )
    return rows


def _marker_path(root: Path, output: str, max_len: int = 255) -> Path:
    """Where Snakemake keeps a per-output record under ``root``: the urlsafe base64 of the
    path, cut into folder levels (each but the last prefixed with "@") when too long."""
    encoded = base64.urlsafe_b64encode(output.encode()).decode()
    parts = [encoded[i : i + max_len - 1] for i in range(0, len(encoded), max_len - 1)]
    return root.joinpath(*(["@" + part for part in parts[:-1]] + [parts[-1]]))


def older_version(workdir: Path, row: SummaryRow) -> str | None:
    """Why an output whose params changed is stale when its stage's code version changed
    (vlmflow.core.stage_versions): "made by stage version N (now M)", read from the params
    Snakemake recorded for it (``.snakemake/metadata``); None otherwise."""
    current = STAGE_VERSIONS.get(row.rule)
    if current is None or row.status != PARAMS_CHANGED:
        return None
    record = _marker_path(workdir / ".snakemake" / "metadata", row.output)
    try:
        params = json.loads(record.read_text(encoding="utf-8")).get("params") or []
    except (OSError, ValueError):
        return None
    made_by = recorded_version([str(value) for value in params])
    if made_by >= current:
        return None
    return f"made by stage version {made_by} (now {current})"


def read_incomplete(workdir: Path) -> tuple[set[str], list[str]]:
    """Outputs that Snakemake marked as started but not finished, and the markers that
    could not be read as one (reported, never skipped silently: the output they stand for
    may be half-written).

    Snakemake's file persistence keeps one marker per output under
    ``.snakemake/incomplete``, named by the urlsafe base64 of the output's path and cut
    into folder levels (each but the last prefixed with "@") when longer than a file name
    may be.
    """
    root = workdir / ".snakemake" / "incomplete"
    outputs: set[str] = set()
    unreadable: list[str] = []
    if not root.is_dir():
        return outputs, unreadable
    for marker in sorted(root.rglob("*")):
        if not marker.is_file() or marker.name == "migration_underway":
            continue
        encoded = "".join(part.removeprefix("@") for part in marker.relative_to(root).parts)
        try:
            outputs.add(base64.urlsafe_b64decode(encoded.encode()).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError) as error:
            unreadable.append(
                f"incomplete marker {marker.relative_to(workdir)} does not decode to an "
                f"output path ({error}): a job's output may be half-written; "
                "`snakemake --rerun-incomplete` redoes what Snakemake knows of"
            )
    return outputs, unreadable


def snakemake_executable() -> str:
    """The snakemake installed beside this Python (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "snakemake"
    if beside.exists():
        return str(beside)
    found = shutil.which("snakemake")
    if found is None:
        raise StatusError("snakemake not found beside this Python or on PATH")
    return found


def run_summary(workdir: Path, snakemake_args: list[str]) -> list[SummaryRow]:
    """Ask Snakemake (without taking its lock, so it works during a run).

    Like every Snakemake run that is not a dry run, this leaves a (one-line) run log in
    ``.snakemake/log``.
    """
    if not workdir.is_dir():
        raise StatusError(f"{workdir}: no such folder")
    if not (workdir / "Snakefile").exists() and not (workdir / "workflow/Snakefile").exists():
        raise StatusError(
            f"{workdir}: no Snakefile here; run vlmflow status in the workflow folder"
        )
    argv = [snakemake_executable(), "--detailed-summary", "--nolock", *snakemake_args]
    try:
        done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, check=False)
    except OSError as error:
        raise StatusError(f"could not run {argv[0]}: {error}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        tail = "\n".join(f"  {line}" for line in lines[-10:])
        raise StatusError(
            f"snakemake --detailed-summary failed in {workdir}: {last_error_of(lines)}\n"
            f"Its last lines:\n{tail}"
        )
    return parse_summary(done.stdout)


def stale_reason(row: SummaryRow, pending: set[str], incomplete: set[str]) -> str | None:
    """Why an existing output will be made again, or None if it is done or missing."""
    if not row.exists:
        return None
    if row.output in incomplete:
        return INCOMPLETE
    if row.up_to_date:
        return None
    if row.status != "ok":
        return row.status
    if any(path in pending for path in row.inputs):
        return UPSTREAM
    # Pending for a reason --summary does not show: another output of the same job is
    # missing, or the run is forced.
    return "another output of its job is missing"


# ---------------------------------------------------------------------------
# Samples kept and lost, from the stage outputs
# ---------------------------------------------------------------------------


def shard_of(path: str) -> tuple[str, str] | None:
    match = _SHARD_PATH.match(path)
    return (match["dataset"], match["shard"]) if match else None


def count_samples(
    workdir: Path, stage: str, dataset: str, shard: str, funnels: dict[tuple[str, str], Funnel]
) -> ShardSamples:
    """Samples kept and dropped (by reason) at one funnel stage of a shard, counted by
    vlmflow.core.contract as the report counts them (``funnels``: each shard read once)."""
    if (dataset, shard) not in funnels:
        funnels[(dataset, shard)] = shard_counts(workdir, dataset, shard)
    kept, dropped, noted = stage_samples(funnels[(dataset, shard)], stage)
    return ShardSamples(kept, sum(dropped.values()), dropped, noted)


# ---------------------------------------------------------------------------
# Failed jobs, from Snakemake's run logs
# ---------------------------------------------------------------------------


_ERROR_BLOCK = re.compile(r"^Error in rule (?P<rule>\S+):\s*$")
_BLOCK_FIELD = re.compile(r"^\s+(?P<name>output|log):\s*(?P<value>.*)$")


def parse_error_blocks(text: str) -> list[tuple[str, list[str], str]]:
    """(rule, outputs, job log) of every "Error in rule" block of a Snakemake run log."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _ERROR_BLOCK.match(line)
        if not match:
            continue
        outputs: list[str] = []
        log = ""
        for following in lines[i + 1 : i + 20]:
            field_match = _BLOCK_FIELD.match(following)
            if field_match is None:
                if following.startswith((" ", "\t")):
                    continue
                break
            value = field_match["value"].split(" (check log", 1)[0].strip()
            if field_match["name"] == "output":
                outputs = [v.strip() for v in value.split(",") if v.strip()]
            else:
                log = value.split(",")[0].strip()
        blocks.append((match["rule"], outputs, log))
    return blocks


_PROGRESS = re.compile(r"\d+%\|")
# An exception ("ValueError: ...", "torch.OutOfMemoryError: ..."), a logged error
# ("... ERROR vlmflow: ...", "slurmstepd: error: ..."), or a kill.
_ERROR_LINE = re.compile(
    r"^(?:[\w.]+(?:Error|Exception|Exit|Interrupt)\b|.*\b(?:ERROR|CRITICAL)\b|.*\berror:|"
    r".*\b(?:Killed|CANCELLED|oom-kill|TIME LIMIT)\b)"
)


def last_error_line(log: Path) -> str:
    """The last line of a job log that reads as an error (for a Python job, the exception
    and its message), else its last line that is not blank, a progress bar or a traceback
    frame."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"(log {log} not readable)"
    return last_error_of(lines) or "(empty log)"


def last_error_of(lines: list[str]) -> str:
    """The last error line of some output (see last_error_line), or ""."""
    meaningful = [
        text
        for text in (line.strip() for line in lines)
        if text and not _PROGRESS.search(text) and not text.startswith(("File ", "^", "~"))
    ]
    for text in reversed(meaningful):
        if _ERROR_LINE.match(text):
            return text
    return meaningful[-1] if meaningful else ""


def failed_jobs(
    workdir: Path, rows: Iterable[SummaryRow], incomplete: set[str] | None = None
) -> list[FailedJob]:
    """Jobs whose last run failed and which have not been made since: one of their outputs
    is missing or incomplete."""
    incomplete = incomplete or set()
    exists = {row.output: row.exists for row in rows}
    latest: dict[tuple[str, tuple[str, ...]], tuple[str, list[str], str]] = {}
    run_logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    for run_log in run_logs:  # named by start time: a later failure of the same job wins
        text = run_log.read_text(encoding="utf-8", errors="replace")
        for rule, outputs, log in parse_error_blocks(text):
            latest[(rule, tuple(outputs))] = (rule, outputs, log)

    def made(output: str) -> bool:
        present = exists.get(output)
        if present is None:  # not in this DAG (made for another target): ask the disk
            present = (workdir / output).exists()
        return present and output not in incomplete

    failed = []
    for rule, outputs, log in latest.values():
        if not outputs or all(made(output) for output in outputs):
            continue
        last = last_error_line(workdir / log) if log else "(the job has no log file)"
        failed.append(FailedJob(rule, outputs, log, last))
    return failed


# ---------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------


def collect(workdir: Path, rows: list[SummaryRow], incomplete: set[str] | None = None) -> Status:
    incomplete = incomplete or set()
    pending = {row.output for row in rows if not row.up_to_date or row.output in incomplete}
    per_shard: dict[tuple[str, str, str], list[SummaryRow]] = {}
    singles = []
    stale: dict[str, dict[str, list[str]]] = {}
    warnings: list[str] = []
    for row in rows:
        reason = stale_reason(row, pending, incomplete)
        if reason == PARAMS_CHANGED:
            reason = older_version(workdir, row) or reason
        if reason is not None:
            stale.setdefault(row.rule, {}).setdefault(reason, []).append(row.output)
        if row.rule in SHARD_RULES:
            where = shard_of(row.output)
            if where is not None:
                per_shard.setdefault((row.rule, *where), []).append(row)
        elif row.rule in SINGLE_STAGES:
            state = "missing" if not row.exists else ("stale" if row.output in pending else "done")
            singles.append({"rule": row.rule, "output": row.output, "state": state})
    singles.sort(key=lambda single: SINGLE_STAGES.index(single["rule"]))
    datasets = sorted({dataset for _, dataset, _ in per_shard})
    funnels: dict[tuple[str, str], Funnel] = {}
    stages = []
    for dataset in datasets:
        for rule, funnel_stage, label in SHARD_STAGES:
            shards = {
                shard: shard_rows
                for (r, d, shard), shard_rows in per_shard.items()
                if r == rule and d == dataset
            }
            if not shards:
                continue
            stage = StageStatus(dataset, label, rule, shards_total=len(shards))
            reasons: Counter[str] = Counter()
            phase1_only: Counter[str] = Counter()
            for shard, shard_rows in shards.items():
                if not all(row.exists for row in shard_rows):
                    continue
                if any(row.output in pending for row in shard_rows):
                    stage.shards_stale += 1
                else:
                    stage.shards_done += 1
                if any(row.output in incomplete for row in shard_rows):
                    continue  # half-written: its counts mean nothing yet
                try:
                    samples = count_samples(workdir, funnel_stage, dataset, shard, funnels)
                except (OSError, ValueError, KeyError, TypeError) as error:
                    files = ", ".join(row.output for row in shard_rows)
                    warnings.append(f"{rule} {files}: samples not readable ({error})")
                    continue
                stage.samples_ok += samples.ok
                stage.samples_failed += samples.failed
                reasons.update(samples.reasons)
                phase1_only.update(samples.phase1_only)
            stage.failure_reasons = dict(reasons.most_common())
            stage.phase1_only = dict(phase1_only.most_common())
            stages.append(stage)
    failed = failed_jobs(workdir, rows, incomplete)
    return Status(str(workdir), stages, singles, stale, failed, warnings)


def render(status: Status, examples: int = 3) -> str:
    out = [f"vlmflow status of {status.workdir}", ""]
    header = (
        f"{'dataset':<16} {'stage':<20} {'shards done':>11} {'stale':>6} "
        f"{'samples ok':>11} {'failed':>7}  failures by reason"
    )
    out += [header, "-" * len(header)]
    for stage in status.stages:
        reasons = [f"{k} {v}" for k, v in stage.failure_reasons.items()]
        if stage.phase1_only:
            kept = ", ".join(f"{k} {v}" for k, v in stage.phase1_only.items())
            reasons.append(f"(kept with phase-1 attributes only: {kept})")
        out.append(
            f"{stage.dataset:<16} {stage.stage:<20} "
            f"{f'{stage.shards_done}/{stage.shards_total}':>11} {stage.shards_stale:>6} "
            f"{stage.samples_ok:>11} {stage.samples_failed:>7}  {', '.join(reasons)}".rstrip()
        )
    if status.singles:
        out += ["", "Whole-run steps:"]
        out += [f"  {s['rule']:<16} {s['state']:<8} {s['output']}" for s in status.singles]
    out += ["", "Stale (exists, but Snakemake would redo it), by rule and reason:"]
    if not status.stale:
        out.append("  nothing")
    for rule, by_reason in sorted(status.stale.items()):
        for reason, outputs in sorted(by_reason.items()):
            shown = ", ".join(outputs[:examples]) + (" ..." if len(outputs) > examples else "")
            out.append(f"  {rule}: {len(outputs)} {reason} ({shown})")
    out += ["", "Failed jobs (still to redo), with the last error line of their log:"]
    if not status.failed:
        out.append("  none")
    for job in status.failed:
        out.append(f"  {job.rule} -> {', '.join(job.outputs) or '?'}")
        out.append(f"    {job.log or '(no log)'}: {job.last_error}")
    if status.warnings:
        out += ["", "Warnings:", *(f"  {warning}" for warning in status.warnings)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmflow status",
        description="Shards done per dataset and stage, samples kept and lost, what is "
        "stale and why (Snakemake's --detailed-summary), and why failed jobs failed.",
    )
    parser.add_argument("--directory", "-d", type=Path, default=Path.cwd(), help="workflow folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--profile", help="passed to snakemake (a profile that sets config or a configfile)"
    )
    parser.add_argument(
        "--configfile", nargs="+", default=[], help="passed to snakemake: the run's config"
    )
    parser.add_argument(
        "snakemake_args",
        nargs=argparse.REMAINDER,
        help="after --: passed to snakemake --detailed-summary (e.g. --config seed=1)",
    )
    args = parser.parse_args(argv)
    extra = [a for a in args.snakemake_args if a != "--"]
    if args.profile:
        extra = ["--profile", args.profile, *extra]
    if args.configfile:
        extra = ["--configfile", *args.configfile, *extra]
    workdir = args.directory.resolve()
    try:
        rows = run_summary(workdir, extra)
        incomplete, unreadable = read_incomplete(workdir)
        status = collect(workdir, rows, incomplete)
        status.warnings.extend(unreadable)
    except StatusError as error:
        print(f"vlmflow status: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(render(status))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
