"""vlmflow status: Snakemake's summary, stage outputs and run logs read back."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

from vlmflow import status
from vlmflow.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
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


def test_samples_ok_and_failed_come_from_each_stage_output(tmp_path: Path) -> None:
    stats = tmp_path / "000000.stats.json"
    stats.write_text(
        json.dumps({"ok": 6, "failed": {"http_404": 1, "too_small": 1}, "failures": [{}, {}]}),
        encoding="utf-8",
    )
    counts = status.count_samples("ingest", [tmp_path / "000000.tar", stats])
    assert counts == status.ShardSamples(6, 2, {"http_404": 1, "too_small": 1})

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
    counts = status.count_samples("attributes_phase1", [table])
    assert counts == status.ShardSamples(2, 2, {"unparsable": 1, "generation_error": 1})

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
    counts = status.count_samples("h5", [tmp_path / "h5/phase1/000000.h5", shard])
    assert counts == status.ShardSamples(5, 3, {"missing_attributes": 1, "too_long": 2})


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
    assert status.read_incomplete(tmp_path) == {"results/d/captions/000001.parquet", long_output}
    assert status.read_incomplete(tmp_path / "elsewhere") == set()


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


def test_phase2_failures_of_kept_samples_are_counted_apart(tmp_path: Path) -> None:
    table = tmp_path / "000000.parquet"
    rows = [
        {
            "key": f"k{i}",
            "raw_answer": "",
            "phase1_attributes": ["a"],
            "phase2_attributes": [],
            "attributes": ["a"],
            "attribute_sources": ["phase1"],
            "phase2_failure": phase2_failure,
            "model": "m",
            "prompt_id": "p",
            "settings": "{}",
            "failure": failure,
        }
        for i, (failure, phase2_failure) in enumerate(
            [(None, None), (None, "no_items: empty"), (None, "no_items"), ("caption_failed", None)]
        )
    ]
    write_rows_parquet(table, rows, PHASE2_SCHEMA)
    counts = status.count_samples("attributes_phase2", [table])
    assert counts == status.ShardSamples(3, 1, {"caption_failed": 1}, {"no_items": 2})


def test_collect_counts_shards_and_samples_per_dataset_and_stage(tmp_path: Path) -> None:
    for shard, ok in (("000000", 8), ("000001", 7), ("000002", 8)):
        stats = tmp_path / f"results/d/shards/{shard}.stats.json"
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps({"ok": ok, "failed": {"not_image": 8 - ok}}), "utf-8")
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
