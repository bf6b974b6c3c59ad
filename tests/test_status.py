"""vlmflow status: Snakemake's summary, stage outputs and run logs read back."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

from tests.test_report import FATES, shard_files
from vlmflow.core.contract import (
    DROPS,
    PHASE2_ANSWER,
    SHARD_OUTPUTS,
    dataset_funnel,
    failure_rows,
    total_funnel,
)
from vlmflow.reporting import status

DATE = "Sun Nov 22 13:25:20 2026"
SUMMARY = "\n".join(
    [
        "Building DAG of jobs...",
        "output_file\tdate\trule\tlog-file(s)\tstatus\tplan",
        *(
            "\t".join(cells)
            for cells in [
                (
                    "results/eval/metrics.tsv",
                    "-",
                    "metrics_table",
                    "-",
                    "missing",
                    "update pending",
                ),
                ("results/d/shards/000000.tar", DATE, "ingest", "logs/i.log", "ok", "no update"),
                ("results/d/shards/000000.stats.json", DATE, "ingest", "-", "ok", "no update"),
            ]
        ),
        "a warning Snakemake printed in between",
        *(
            "\t".join(cells)
            for cells in [
                (
                    "results/d/attributes/phase1/000000.parquet",
                    DATE,
                    "attributes_phase1",
                    "logs/x.log",
                    "params changed",
                    "update pending",
                ),
                (
                    "results/d/attributes/phase1/000001.parquet",
                    "-",
                    "attributes_phase1",
                    "-",
                    "missing",
                    "update pending",
                ),
            ]
        ),
    ]
)

RUN_LOG = """\
[Sun Nov 22 13:26:24 2026]
Error in rule caption:
    message: None
    jobid: 0
    input: results/d/shards/000001.tar, config/prompts/caption.txt, results/models/demo-vlm
    output: results/d/captions/000001.parquet
    log: logs/caption/d/000001.log (check log file(s) for error details)
Logfile logs/caption/d/000001.log:
================================================================================
Error in rule h5_index:
    jobid: 3
    output: results/d/h5/metadata.json, results/d/h5/data_params.json
Shutting down, this might take some time.
"""


def row(output: str, rule: str, status_: str = "ok", plan: str = "no update") -> status.SummaryRow:
    return status.SummaryRow(
        output, "-" if status_ == "missing" else DATE, rule, "-", status_, plan
    )


def test_parse_summary_reads_every_row_and_skips_other_lines() -> None:
    rows = status.parse_summary(SUMMARY)
    assert [row.rule for row in rows] == [
        "metrics_table",
        "ingest",
        "ingest",
        "attributes_phase1",
        "attributes_phase1",
    ]
    stale = rows[3]
    assert stale.exists and not stale.up_to_date and stale.status == "params changed"
    assert rows[1].up_to_date and not rows[0].exists


def test_parse_summary_without_a_table_says_so() -> None:
    with pytest.raises(status.StatusError, match="no 'output_file' header"):
        status.parse_summary("Building DAG of jobs...\n")


def test_shard_of_finds_dataset_and_shard_in_stage_outputs() -> None:
    assert status.shard_of("results/d/shards/000003.stats.json") == ("d", "000003")
    assert status.shard_of("results/d/attributes/phase2/000001.parquet") == ("d", "000001")
    assert status.shard_of("results/d/h5/images/000002") == ("d", "000002")
    assert status.shard_of("logs/caption/d/000001.log") is None


def test_error_blocks_name_rule_outputs_and_job_log() -> None:
    assert status.parse_error_blocks(RUN_LOG) == [
        ("caption", ["results/d/captions/000001.parquet"], "logs/caption/d/000001.log"),
        ("h5_index", ["results/d/h5/metadata.json", "results/d/h5/data_params.json"], ""),
    ]


def test_last_error_line_is_the_exception_not_a_frame_or_a_bar(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text(
        "caption 000001:   0%|          | 0/2 [00:00<?, ?batch/s]\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 3, in <module>\n'
        "    raise ValueError('shard 000001: no image for key k7')\n"
        "    ^^^^^^^^^^^^^^^^\n"
        "ValueError: shard 000001: no image for key k7\n"
        "caption 000001:  50%|#####     | 1/2 [00:01<00:01, 1.0batch/s]\n\n",
        encoding="utf-8",
    )
    assert status.last_error_line(log) == "ValueError: shard 000001: no image for key k7"
    assert "not readable" in status.last_error_line(tmp_path / "none.log")


def test_failed_jobs_are_those_whose_outputs_are_still_not_done(tmp_path: Path) -> None:
    runs = tmp_path / ".snakemake" / "log"
    runs.mkdir(parents=True)
    (runs / "2026-11-22T100000.000000.snakemake.log").write_text(RUN_LOG, encoding="utf-8")
    (tmp_path / "logs/caption/d").mkdir(parents=True)
    (tmp_path / "logs/caption/d/000001.log").write_text("OSError: disk full\n", encoding="utf-8")
    pending = status.SummaryRow(
        "results/d/captions/000001.parquet", "-", "caption", "-", "missing", "update pending"
    )
    done = [
        status.SummaryRow(path, "Sun Nov 22", "h5_index", "-", "ok", "no update")
        for path in ("results/d/h5/metadata.json", "results/d/h5/data_params.json")
    ]
    failed = status.failed_jobs(tmp_path, [pending, *done])
    assert failed == [
        status.FailedJob(
            "caption",
            ["results/d/captions/000001.parquet"],
            "logs/caption/d/000001.log",
            "OSError: disk full",
        )
    ]


def write_shard_outputs(workdir: Path, dataset: str, shard: str) -> list[status.SummaryRow]:
    """A shard whose samples fail at every stage (tests/test_report.py's FATES), written
    where the rules write them; the summary rows Snakemake would show for them."""
    made = shard_files(workdir / "made", shard, FATES, {"http_status": 3, "not_image": 1})
    rows = []
    for name, rule in RULE_OF.items():
        path = Path(SHARD_OUTPUTS[name].format(dataset=dataset, shard=shard))
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        made[name].rename(workdir / path)
        rows.append(row(str(path), rule))
    return rows


RULE_OF = {
    "stats": "ingest",
    "captions": "caption",
    "phase1": "attributes_phase1",
    "phase2": "attributes_phase2",
    "h5": "h5",
}


def test_status_and_the_report_count_every_stage_alike(tmp_path: Path) -> None:
    rows = write_shard_outputs(tmp_path, "d", "000000")
    rows += write_shard_outputs(tmp_path, "d", "000001")
    paths = {
        name: [
            tmp_path / SHARD_OUTPUTS[name].format(dataset="d", shard=s)
            for s in ("000000", "000001")
        ]
        for name in RULE_OF
    }
    total = total_funnel(
        dataset_funnel(
            paths["stats"], paths["captions"], paths["phase1"], paths["phase2"], paths["h5"]
        )
    )
    by_stage: dict[str, dict[str, int]] = {}
    for stage, reason, count, _ in failure_rows(total):
        by_stage.setdefault(stage, {})[reason] = count

    report = status.collect(tmp_path, rows)
    stages = {stage.stage: stage for stage in report.stages}
    assert list(stages) == [label for _, _, label in status.SHARD_STAGES]
    for _, funnel_stage, label in status.SHARD_STAGES:
        dropping = DROPS[funnel_stage][0]
        assert stages[label].samples_ok == total.counts[funnel_stage], label
        assert stages[label].failure_reasons == by_stage.get(dropping, {}), label
        assert stages[label].samples_failed == sum(by_stage.get(dropping, {}).values()), label
    assert stages["attributes phase 2"].phase1_only == by_stage[PHASE2_ANSWER]
    # A failure at every stage that can drop one here (phase 2's refusal keeps its
    # sample), each counted once: phase 1 does not count the carried caption failure.
    failing = {label for label, stage in stages.items() if stage.samples_failed}
    assert failing == {"ingest", "caption", "attributes phase 1", "h5 phase 2"}
    assert stages["attributes phase 1"].failure_reasons == {"no_items": 2, "generation_error": 2}


def test_status_of_a_folder_without_a_workflow_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status.main(["--directory", str(tmp_path)]) == 2
    assert "no Snakefile here" in capsys.readouterr().err


DETAILED = "\n".join(
    [
        "output_file\tdate\trule\tlog-file(s)\tinput-file(s)\tshellcmd\tstatus\tplan",
        "results/d/captions/000000.parquet\t" + DATE + "\tcaption\tlogs/c.log\t"
        "config/prompts/caption.txt,results/d/shards/000000.tar\t-\tparams changed\tupdate pending",
        "results/d/attributes/phase1/000000.parquet\t" + DATE + "\tattributes_phase1\t"
        "logs/a.log\tresults/d/captions/000000.parquet\t-\tok\tupdate pending",
        "results/models/demo-vlm\t" + DATE + "\tdemo_model\tlogs/m.log\t\t-\tok\tno update",
        "results/d/shards/000001.tar\t-\tingest\t-\t-\t-\tmissing\tupdate pending",
    ]
)


def test_detailed_summary_rows_carry_their_recorded_input_files() -> None:
    rows = status.parse_summary(DETAILED)
    assert [row.inputs for row in rows] == [
        ("config/prompts/caption.txt", "results/d/shards/000000.tar"),
        ("results/d/captions/000000.parquet",),
        (),
        (),
    ]
    assert rows[0].status == "params changed" and rows[3].plan == "update pending"


def test_stale_reason_names_snakemakes_reason_or_the_upstream_job() -> None:
    caption, phase1, model, missing = status.parse_summary(DETAILED)
    pending = {caption.output, phase1.output, missing.output}
    assert status.stale_reason(caption, pending, set()) == "params changed"
    # --summary says "ok" for an output redone only because its input will be.
    assert status.stale_reason(phase1, pending, set()) == status.UPSTREAM
    assert status.stale_reason(phase1, set(), set()) == "another output of its job is missing"
    assert status.stale_reason(model, pending, set()) is None
    assert status.stale_reason(missing, pending, set()) is None
    # An output being written (or left half-written) is never done, whatever --summary says.
    assert status.stale_reason(model, pending, {model.output}) == status.INCOMPLETE


def write_marker(root: Path, output: str, max_len: int = 255) -> None:
    """An incomplete marker as Snakemake's file persistence writes it."""
    encoded = base64.urlsafe_b64encode(output.encode()).decode()
    parts = [encoded[i : i + max_len - 1] for i in range(0, len(encoded), max_len - 1)]
    path = root.joinpath(*(["@" + p for p in parts[:-1]] + [parts[-1]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"external_jobid": null}', encoding="utf-8")


def test_incomplete_markers_are_read_back_as_output_paths(tmp_path: Path) -> None:
    root = tmp_path / ".snakemake" / "incomplete"
    long_output = "results/" + "d" * 300 + "/captions/000000.parquet"
    write_marker(root, "results/d/captions/000001.parquet")
    write_marker(root, long_output)
    (root / "migration_underway").write_text("", encoding="utf-8")
    assert status.read_incomplete(tmp_path) == (
        {"results/d/captions/000001.parquet", long_output},
        [],
    )
    assert status.read_incomplete(tmp_path / "elsewhere") == (set(), [])
    # A marker that is no base64 of a path (another Snakemake's) is reported, not skipped.
    (root / "not-base64!").write_text("", encoding="utf-8")
    outputs, unreadable = status.read_incomplete(tmp_path)
    assert len(outputs) == 2
    assert len(unreadable) == 1
    assert unreadable[0].startswith("incomplete marker .snakemake/incomplete/not-base64! ")


def test_a_failed_job_made_since_is_not_failed_even_when_stale_now(tmp_path: Path) -> None:
    runs = tmp_path / ".snakemake" / "log"
    runs.mkdir(parents=True)
    (runs / "2026-11-22T100000.000000.snakemake.log").write_text(RUN_LOG, encoding="utf-8")
    made_then_edited = row(
        "results/d/captions/000001.parquet", "caption", "params changed", "update pending"
    )
    # h5_index's outputs are not in this summary: the disk says they are still missing.
    (still_failed,) = status.failed_jobs(tmp_path, [made_then_edited])
    assert still_failed.rule == "h5_index"
    (tmp_path / "results/d/h5").mkdir(parents=True)
    for name in ("metadata.json", "data_params.json"):
        (tmp_path / "results/d/h5" / name).write_text("{}", encoding="utf-8")
    assert status.failed_jobs(tmp_path, [made_then_edited]) == []
    # ... unless what exists is only half-written.
    (failed,) = status.failed_jobs(
        tmp_path, [made_then_edited], incomplete={made_then_edited.output}
    )
    assert failed.rule == "caption" and failed.last_error.startswith("(log ")


def test_last_error_line_prefers_the_error_over_later_chatter(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text(
        "2026-11-22 13:37:11,924 INFO vlmflow: host vm\n"
        "2026-11-22 13:37:12,000 ERROR vlmflow: shard 000001: model folder is empty\n"
        "2026-11-22 13:37:12,100 INFO vlmflow: wrote nothing\n",
        encoding="utf-8",
    )
    assert status.last_error_line(log) == (
        "2026-11-22 13:37:12,000 ERROR vlmflow: shard 000001: model folder is empty"
    )
    log.write_text("just a line\n\n", encoding="utf-8")
    assert status.last_error_line(log) == "just a line"
    log.write_text("", encoding="utf-8")
    assert status.last_error_line(log) == "(empty log)"


def test_collect_counts_shards_and_samples_per_dataset_and_stage(tmp_path: Path) -> None:
    for shard, ok in (("000000", 8), ("000001", 7), ("000002", 8)):
        stats = tmp_path / f"results/d/shards/{shard}.stats.json"
        stats.parent.mkdir(parents=True, exist_ok=True)
        counts = {"shard": shard, "rows_in": 8, "ok": ok, "failed": {"not_image": 8 - ok}}
        stats.write_text(json.dumps(counts), "utf-8")
    rows = [
        row("results/d/shards/000000.tar", "ingest"),
        row("results/d/shards/000000.stats.json", "ingest"),
        row("results/d/shards/000001.tar", "ingest", "params changed", "update pending"),
        row("results/d/shards/000001.stats.json", "ingest", "params changed", "update pending"),
        row("results/d/shards/000002.tar", "ingest"),
        row("results/d/shards/000002.stats.json", "ingest"),
        row("results/d/shards/000003.tar", "ingest", "missing", "update pending"),
        row("results/d/shards/000003.stats.json", "ingest", "missing", "update pending"),
        row("results/train/phase2", "train_phase2", "missing", "update pending"),
        row("results/train/phase1", "train_phase1"),
    ]
    incomplete = {"results/d/shards/000002.tar"}
    report = status.collect(tmp_path, rows, incomplete)
    (ingest,) = report.stages
    assert (ingest.shards_done, ingest.shards_stale, ingest.shards_total) == (1, 2, 4)
    # The half-written shard's stats are not counted; the stale one's are (they exist).
    assert (ingest.samples_ok, ingest.samples_failed) == (15, 1)
    assert ingest.failure_reasons == {"not_image": 1}
    assert report.singles == [
        {"rule": "train_phase1", "output": "results/train/phase1", "state": "done"},
        {"rule": "train_phase2", "output": "results/train/phase2", "state": "missing"},
    ]
    assert report.stale == {
        "ingest": {
            "params changed": [
                "results/d/shards/000001.tar",
                "results/d/shards/000001.stats.json",
            ],
            status.INCOMPLETE: ["results/d/shards/000002.tar"],
        }
    }
    text = status.render(report)
    assert "d                ingest                       1/4      2          15       1" in text
    assert "ingest: 1 incomplete" in text and "Failed jobs" in text


def test_unreadable_stage_output_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    stats = tmp_path / "results/d/shards/000000.stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text("{not json", encoding="utf-8")
    rows = [
        row("results/d/shards/000000.tar", "ingest"),
        row("results/d/shards/000000.stats.json", "ingest"),
    ]
    report = status.collect(tmp_path, rows)
    assert report.stages[0].shards_done == 1
    (warning,) = report.warnings
    assert warning.startswith("ingest results/d/shards/000000.tar") and "not readable" in warning


def test_profile_configfile_and_extra_arguments_reach_snakemake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []

    def summary(workdir: Path, args: list[str]) -> list[status.SummaryRow]:
        seen.append(args)
        return status.parse_summary(SUMMARY)

    monkeypatch.setattr(status, "run_summary", summary)
    argv = ["-d", str(tmp_path), "--json", "--profile", "profiles/slurm"]
    argv += ["--configfile", "a.yaml", "b.yaml", "--", "--config", "seed=1"]
    assert status.main(argv) == 0
    assert seen == [
        ["--configfile", "a.yaml", "b.yaml", "--profile", "profiles/slurm", "--config", "seed=1"]
    ]
    assert json.loads(capsys.readouterr().out)["stale"] == {
        "attributes_phase1": {"params changed": ["results/d/attributes/phase1/000000.parquet"]}
    }


def test_snakemake_failing_is_reported_with_its_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "Snakefile").write_text("", encoding="utf-8")
    fake = tmp_path / "snakemake"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "print('Traceback (most recent call last):', file=sys.stderr)\n"
        "print(\"ValidationError: 'many' is not of type 'integer'\", file=sys.stderr)\n"
        "sys.exit(1)\n",
        encoding="utf-8",
    )
    fake.chmod(0o755)
    monkeypatch.setattr(status, "snakemake_executable", lambda: str(fake))
    assert status.main(["--directory", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"vlmflow status: snakemake --detailed-summary failed in {tmp_path}: "
        "ValidationError: 'many' is not of type 'integer'"
    )


def test_outputs_of_an_older_stage_version_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caption made before its stage's version was bumped: Snakemake's summary says
    "params changed", the record it keeps says which version made it."""
    output = "results/d/captions/000000.parquet"
    record = status._marker_path(tmp_path / ".snakemake" / "metadata", output)
    record.parent.mkdir(parents=True)
    # Version 1 outputs carry no version in their params (vlmflow.core.stage_versions.FIRST).
    record.write_text(json.dumps({"params": ["{'model': 'm', 'seed': 0}"]}), encoding="utf-8")
    row = status.SummaryRow(
        output, "Mon Dec  7", "caption", "-", "params changed", "update pending"
    )
    assert status.older_version(tmp_path, row) is None  # the version is still 1
    monkeypatch.setitem(status.STAGE_VERSIONS, "caption", 2)
    assert status.older_version(tmp_path, row) == "made by stage version 1 (now 2)"
    collected = status.collect(tmp_path, [row])
    assert collected.stale == {"caption": {"made by stage version 1 (now 2)": [output]}}
    record.write_text(
        json.dumps({"params": ["{'model': 'm', 'seed': 0, 'stage_version': 2}"]}), encoding="utf-8"
    )
    assert status.older_version(tmp_path, row) is None  # made by this version: other params
