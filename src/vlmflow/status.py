"""``vlmflow status``: where a run stands, per dataset and stage, at a glance.

What is done, stale or missing comes from Snakemake's own ``--summary`` (the same
decision ``snakemake all`` would take, with its reason: "missing", "params changed",
"updated input files", "code changed" ...); how many samples each finished shard kept or
lost comes from the stage outputs themselves (ingest stats, the ``failure`` column of
caption and attribute tables, the h5 shard parameters); and why a job failed comes from
Snakemake's run logs (``.snakemake/log``: each "Error in rule" block names the job's log
file), reported while that job's outputs are still not up to date, with the last error
line of its log.
"""

from __future__ import annotations

import argparse
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

# Per-shard stages in pipeline order: (rule, label).
SHARD_STAGES = [
    ("ingest", "ingest"),
    ("caption", "caption"),
    ("attributes_phase1", "attributes phase 1"),
    ("attributes_phase2", "attributes phase 2"),
    ("h5", "h5"),
]
SHARD_RULES = {rule for rule, _ in SHARD_STAGES}
# Whole-run steps shown one line each.
SINGLE_STAGES = ["train_phase1", "train_phase2", "evaluate", "metrics_table"]
# results/<dataset>/<anything>/<shard>[.<ext>]
_SHARD_PATH = re.compile(r"^results/(?P<dataset>[^/]+)/(?:[^/]+/)*(?P<shard>[^/.]+)(?:\.[^/]*)?$")
UP_TO_DATE = "no update"


class StatusError(Exception):
    """The folder is not a workflow, or Snakemake could not say what its state is."""


@dataclass(frozen=True)
class SummaryRow:
    """One line of ``snakemake --summary``."""

    output: str
    date: str
    rule: str
    log: str
    status: str
    plan: str

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


@dataclass(frozen=True)
class FailedJob:
    rule: str
    outputs: list[str]
    log: str
    last_error: str


@dataclass
class Status:
    workdir: str
    stages: list[StageStatus]
    singles: list[dict[str, str]]
    stale: dict[str, dict[str, list[str]]]  # rule -> reason -> outputs
    failed: list[FailedJob]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Snakemake's summary
# ---------------------------------------------------------------------------


def parse_summary(text: str) -> list[SummaryRow]:
    """The rows of ``snakemake --summary`` (tab-separated, with a header line)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if line.startswith("output_file\t")), None)
    if header_at is None:
        raise StatusError("snakemake --summary printed no table (no 'output_file' header)")
    header = lines[header_at].split("\t")
    wanted = ["output_file", "date", "rule", "log-file(s)", "status", "plan"]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise StatusError(f"snakemake --summary table lacks columns {missing}: {header}")
    at = {name: header.index(name) for name in wanted}
    rows = []
    for line in lines[header_at + 1 :]:
        cells = line.split("\t")
        if len(cells) != len(header):
            continue  # a warning line Snakemake printed among the rows
        rows.append(
            SummaryRow(
                output=cells[at["output_file"]],
                date=cells[at["date"]],
                rule=cells[at["rule"]],
                log=cells[at["log-file(s)"]],
                status=cells[at["status"]],
                plan=cells[at["plan"]],
            )
        )
    return rows


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
    """Ask Snakemake (without taking its lock, so it works during a run)."""
    if not (workdir / "Snakefile").exists() and not (workdir / "workflow/Snakefile").exists():
        raise StatusError(
            f"{workdir}: no Snakefile here; run vlmflow status in the workflow folder"
        )
    argv = [snakemake_executable(), "--summary", "--nolock", *snakemake_args]
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise StatusError(f"snakemake --summary failed in {workdir}:\n{tail}")
    return parse_summary(done.stdout)


# ---------------------------------------------------------------------------
# Samples kept and lost, from the stage outputs
# ---------------------------------------------------------------------------


def shard_of(path: str) -> tuple[str, str] | None:
    match = _SHARD_PATH.match(path)
    return (match["dataset"], match["shard"]) if match else None


def count_samples(rule: str, outputs: list[Path]) -> tuple[int, int, Counter[str]]:
    """(ok, failed, failures by reason) of one finished shard of a stage."""
    reasons: Counter[str] = Counter()
    if rule == "ingest":
        for path in outputs:
            if path.name.endswith(".stats.json"):
                stats = json.loads(path.read_text(encoding="utf-8"))
                reasons.update(stats.get("failed", {}))
                return int(stats["ok"]), sum(reasons.values()), reasons
    elif rule in ("caption", "attributes_phase1", "attributes_phase2"):
        import pyarrow.parquet as pq

        for path in outputs:
            if path.suffix == ".parquet":
                failures = pq.read_table(path, columns=["failure"]).column("failure").to_pylist()
                reasons.update(_reason(f) for f in failures if f is not None)
                failed = sum(reasons.values())
                return len(failures) - failed, failed, reasons
    elif rule == "h5":
        for path in outputs:
            if path.suffix == ".json" and path.parent.name == "shards":
                params = json.loads(path.read_text(encoding="utf-8"))
                reasons.update(params.get("skipped", {}))
                too_long = int(params["phase1"].get("discarded_too_long", 0))
                if too_long:
                    reasons["too_long"] += too_long
                return int(params["phase1"]["n_examples"]), sum(reasons.values()), reasons
    return 0, 0, reasons


def _reason(failure: str) -> str:
    """A failure's reason without its detail ("generation_error: CUDA out of memory")."""
    return failure.split(":", 1)[0].strip()


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


def last_error_line(log: Path) -> str:
    """The last line of a job log that is not blank, a progress bar or a traceback frame:
    for a Python job, the exception and its message."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"(log {log} not readable)"
    for line in reversed(lines):
        text = line.strip()
        if not text or _PROGRESS.search(text) or text.startswith(("File ", "^", "~")):
            continue
        return text
    return "(empty log)"


def failed_jobs(workdir: Path, rows: Iterable[SummaryRow]) -> list[FailedJob]:
    """Jobs whose last run failed and whose outputs are still not up to date."""
    up_to_date = {row.output for row in rows if row.up_to_date}
    latest: dict[tuple[str, tuple[str, ...]], tuple[str, list[str], str]] = {}
    run_logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    for run_log in run_logs:  # oldest first: a later failure of the same job replaces it
        text = run_log.read_text(encoding="utf-8", errors="replace")
        for rule, outputs, log in parse_error_blocks(text):
            latest[(rule, tuple(outputs))] = (rule, outputs, log)
    failed = []
    for rule, outputs, log in latest.values():
        if outputs and all(output in up_to_date for output in outputs):
            continue  # fixed since
        last = last_error_line(workdir / log) if log else "(the job has no log file)"
        failed.append(FailedJob(rule, outputs, log, last))
    return failed


# ---------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------


def collect(workdir: Path, rows: list[SummaryRow]) -> Status:
    per_shard: dict[tuple[str, str, str], list[SummaryRow]] = {}
    singles = []
    stale: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        if row.exists and not row.up_to_date:
            stale.setdefault(row.rule, {}).setdefault(row.status, []).append(row.output)
        if row.rule in SHARD_RULES:
            where = shard_of(row.output)
            if where is not None:
                per_shard.setdefault((row.rule, *where), []).append(row)
        elif row.rule in SINGLE_STAGES:
            state = "done" if row.up_to_date else ("stale" if row.exists else "missing")
            singles.append({"rule": row.rule, "output": row.output, "state": state})
    datasets = sorted({dataset for _, dataset, _ in per_shard})
    stages = []
    for dataset in datasets:
        for rule, label in SHARD_STAGES:
            shards = {
                shard: shard_rows
                for (r, d, shard), shard_rows in per_shard.items()
                if r == rule and d == dataset
            }
            if not shards:
                continue
            stage = StageStatus(dataset, label, rule, shards_total=len(shards))
            reasons: Counter[str] = Counter()
            for shard_rows in shards.values():
                if all(row.up_to_date for row in shard_rows):
                    stage.shards_done += 1
                elif all(row.exists for row in shard_rows):
                    stage.shards_stale += 1
                if all(row.exists for row in shard_rows):
                    ok, failed, why = count_samples(
                        rule, [workdir / row.output for row in shard_rows]
                    )
                    stage.samples_ok += ok
                    stage.samples_failed += failed
                    reasons.update(why)
            stage.failure_reasons = dict(reasons.most_common())
            stages.append(stage)
    return Status(str(workdir), stages, singles, stale, failed_jobs(workdir, rows))


def render(status: Status, examples: int = 3) -> str:
    out = [f"vlmflow status of {status.workdir}", ""]
    header = (
        f"{'dataset':<16} {'stage':<20} {'shards done':>11} {'stale':>6} "
        f"{'samples ok':>11} {'failed':>7}  failures by reason"
    )
    out += [header, "-" * len(header)]
    for stage in status.stages:
        reasons = ", ".join(f"{k} {v}" for k, v in stage.failure_reasons.items())
        out.append(
            f"{stage.dataset:<16} {stage.stage:<20} "
            f"{f'{stage.shards_done}/{stage.shards_total}':>11} {stage.shards_stale:>6} "
            f"{stage.samples_ok:>11} {stage.samples_failed:>7}  {reasons}"
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
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmflow status",
        description="Shards done per dataset and stage, samples kept and lost, what is "
        "stale and why (Snakemake's --summary), and why failed jobs failed.",
    )
    parser.add_argument("--directory", "-d", type=Path, default=Path.cwd(), help="workflow folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "snakemake_args",
        nargs=argparse.REMAINDER,
        help="after --: passed to snakemake --summary (e.g. --configfile other.yaml)",
    )
    args = parser.parse_args(argv)
    extra = [a for a in args.snakemake_args if a != "--"]
    workdir = args.directory.resolve()
    try:
        rows = run_summary(workdir, extra)
        status = collect(workdir, rows)
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
