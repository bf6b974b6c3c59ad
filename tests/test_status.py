"""vlmflow status: Snakemake's summary, stage outputs and run logs read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmflow import status
from vlmflow.attributes import PHASE1_SCHEMA
from vlmflow.io import write_rows_parquet

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


def test_samples_ok_and_failed_come_from_each_stage_output(tmp_path: Path) -> None:
    stats = tmp_path / "000000.stats.json"
    stats.write_text(
        json.dumps({"ok": 6, "failed": {"http_404": 1, "too_small": 1}, "failures": [{}, {}]}),
        encoding="utf-8",
    )
    ok, failed, why = status.count_samples("ingest", [tmp_path / "000000.tar", stats])
    assert (ok, failed, dict(why)) == (6, 2, {"http_404": 1, "too_small": 1})

    table = tmp_path / "000000.parquet"
    rows = [
        {
            "key": f"k{i}",
            "web_caption": "",
            "vlm_caption": "",
            "raw_answer": "",
            "attributes": [],
            "model": "m",
            "prompt_id": "p",
            "settings": "{}",
            "failure": failure,
        }
        for i, failure in enumerate([None, None, "unparsable: no list", "generation_error: OOM"])
    ]
    write_rows_parquet(table, rows, PHASE1_SCHEMA)
    ok, failed, why = status.count_samples("attributes_phase1", [table])
    assert (ok, failed, dict(why)) == (2, 2, {"unparsable": 1, "generation_error": 1})

    shard = tmp_path / "h5" / "shards" / "000000.json"
    shard.parent.mkdir(parents=True)
    shard.write_text(
        json.dumps(
            {
                "skipped": {"missing_attributes": 1},
                "phase1": {"n_examples": 5, "discarded_too_long": 2},
            }
        ),
        encoding="utf-8",
    )
    ok, failed, why = status.count_samples("h5", [tmp_path / "h5/phase1/000000.h5", shard])
    assert (ok, failed, dict(why)) == (5, 3, {"missing_attributes": 1, "too_long": 2})


def test_status_of_a_folder_without_a_workflow_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status.main(["--directory", str(tmp_path)]) == 2
    assert "no Snakefile here" in capsys.readouterr().err
