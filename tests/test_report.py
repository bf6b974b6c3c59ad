"""Tests for the report's statistics and pages, on small hand-made stage outputs."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vlmflow.core.contract import (
    PHASE2_ANSWER,
    ReportError,
    dataset_funnel,
    failure_rows,
    total_funnel,
    write_duplicates,
)
from vlmflow.core.io import write_json, write_rows_parquet
from vlmflow.reporting.plots import plot_training
from vlmflow.reporting.report import (
    attribute_stats,
    caption_lengths,
    most_frequent,
    parse_failures,
    read_metrics,
    write_attribute_figures,
    write_caption_lengths,
    write_funnel_report,
    write_metrics_page,
    write_parse_failures_page,
)
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
from vlmflow.stages.caption import CAPTION_SCHEMA

PNG = b"\x89PNG\r\n\x1a\n"

# What becomes of each downloaded sample of the hand-made shard 000000.
FATES = {
    "a": "ok",
    "b": "caption_error",  # the VLM failed: dropped at the caption stage
    "c": "no_items",  # phase 1's answer has no item: dropped at phase 1
    "d": "phase2_refused",  # phase 2's answer refused: kept with phase-1 attributes
    "e": "too_long",  # too long for the phase-2 HDF5 file only
    "f": "generation_error",  # phase 1 never answered
}


def shard_files(
    root: Path, shard: str, fates: dict[str, str], failed: dict[str, int], h5: bool = True
) -> dict[str, Path]:
    """The per-shard outputs every stage would write for samples with these fates."""
    files = {
        "stats": root / f"shards/{shard}.stats.json",
        "captions": root / f"captions/{shard}.parquet",
        "phase1": root / f"phase1/{shard}.parquet",
        "phase2": root / f"phase2/{shard}.parquet",
        "h5": root / f"h5/{shard}.json",
    }
    ok = len(fates)
    write_json(
        files["stats"],
        {"shard": shard, "rows_in": ok + sum(failed.values()), "ok": ok, "failed": failed},
    )
    captions, phase1, phase2 = [], [], []
    for key, fate in fates.items():
        caption_failure = "caption_error: CUDA out of memory" if fate == "caption_error" else None
        captions.append(
            {
                "key": key,
                "web_caption": f"a web caption of {key}",
                "vlm_caption": "" if caption_failure else f"The image shows a red {key} box.",
                "model": "vlm",
                "prompt_id": "p",
                "settings": "{}",
                "failure": caption_failure,
            }
        )
        attributes = [f"{key} box", "red"]
        failure1 = {
            "caption_error": "caption_failed",
            "no_items": "no_items",
            "generation_error": "generation_error: stopped",
            "empty": "empty_answer",
        }.get(fate)
        raw1 = {
            "caption_error": None,
            "generation_error": None,
            "no_items": "I see.",
            "empty": " \n",
        }.get(fate, "1. box\n2. red")
        phase1.append(
            {
                "key": key,
                "web_caption": f"a web caption of {key}",
                "vlm_caption": "",
                "raw_answer": raw1,
                "attributes": [] if failure1 else attributes,
                "model": "llm",
                "prompt_id": "p",
                "settings": "{}",
                "failure": failure1,
            }
        )
        asked = failure1 is None
        refused = fate == "phase2_refused"
        added = [] if refused or not asked else ["lid"]
        phase2.append(
            {
                "key": key,
                "raw_answer": ("Sorry, I can't." if refused else "lid") if asked else None,
                "phase1_attributes": attributes if asked else [],
                "phase2_attributes": added,
                "attributes": [*attributes, *added] if asked else [],
                "attribute_sources": [],
                "phase2_failure": "refused" if refused else None,
                "model": "llm",
                "prompt_id": "p",
                "settings": "{}",
                "failure": failure1,
            }
        )
    write_rows_parquet(files["captions"], captions, CAPTION_SCHEMA)
    write_rows_parquet(files["phase1"], phase1, PHASE1_SCHEMA)
    write_rows_parquet(files["phase2"], phase2, PHASE2_SCHEMA)
    kept = sum(1 for row in phase2 if row["failure"] is None)
    too_long = sum(1 for fate in fates.values() if fate == "too_long")
    if h5:
        write_json(
            files["h5"],
            {
                "shard": shard,
                "skipped": {},
                "phase1": {"n_examples": kept, "discarded_too_long": 0},
                "phase2": {"n_examples": kept - too_long, "discarded_too_long": too_long},
            },
        )
    else:
        del files["h5"]
    return files


def funnel_of(shards: list[dict[str, Path]]) -> list[Any]:
    return dataset_funnel(
        [s["stats"] for s in shards],
        [s["captions"] for s in shards],
        [s["phase1"] for s in shards],
        [s["phase2"] for s in shards],
        [s["h5"] for s in shards if "h5" in s],
    )


def test_funnel_counts_each_sample_once_at_the_stage_that_dropped_it(tmp_path: Path) -> None:
    files = shard_files(tmp_path, "000000", FATES, {"http_status": 3, "not_image": 1})
    [funnel] = funnel_of([files])
    assert funnel.shard == "000000"
    assert funnel.counts == {
        "rows": 10,
        "downloaded": 6,
        "captioned": 5,
        "phase1": 3,
        "phase2": 3,
        "h5_phase1": 3,
        "h5_phase2": 2,
        "distinct": None,  # duplicates not looked for
    }
    assert funnel.failures == Counter(
        {
            ("ingest", "http_status"): 3,
            ("ingest", "not_image"): 1,
            ("caption", "caption_error"): 1,
            # b's carried "caption_failed" is no phase-1 failure.
            ("attributes phase 1", "no_items"): 1,
            ("attributes phase 1", "generation_error"): 1,
            ("h5 phase 2", "discarded_too_long"): 1,
            (PHASE2_ANSWER, "refused"): 1,
        }
    )


def test_total_sums_the_shards_and_failure_rows_give_the_share_of_each_stage_input(
    tmp_path: Path,
) -> None:
    first = shard_files(tmp_path, "000000", FATES, {"http_status": 3, "not_image": 1})
    second = shard_files(tmp_path, "000001", {"x": "ok", "y": "caption_error"}, {"timeout": 2})
    total = total_funnel(funnel_of([first, second]))
    assert total.counts["rows"] == 14 and total.counts["downloaded"] == 8
    assert total.counts["captioned"] == 6 and total.counts["h5_phase2"] == 3
    rows = failure_rows(total)
    assert rows == [
        ("ingest", "http_status", 3, 21.4),  # of 14 rows; most frequent first
        ("ingest", "timeout", 2, 14.3),
        ("ingest", "not_image", 1, 7.1),
        ("caption", "caption_error", 2, 25.0),  # of 8 downloaded
        ("attributes phase 1", "generation_error", 1, 16.7),  # of 6 captioned
        ("attributes phase 1", "no_items", 1, 16.7),
        ("h5 phase 2", "discarded_too_long", 1, 25.0),  # of 4 kept by phase 2
        (PHASE2_ANSWER, "refused", 1, 25.0),
    ]


def test_duplicates_and_leaks_are_counted_after_phase_2_where_they_leave(tmp_path: Path) -> None:
    first = shard_files(tmp_path, "000000", FATES, {})
    second = shard_files(tmp_path, "000001", {"x": "ok", "y": "ok", "z": "caption_error"}, {})
    repeated = tmp_path / "duplicates.tsv"
    # a: kept by phase 2, a leak; x: a duplicate; z: failed at caption, so not counted again.
    write_duplicates(
        [
            {"key": "a", "shard": "000000", "reason": "leak", "detail": "same URL of train t"},
            {"key": "x", "shard": "000001", "reason": "duplicate", "detail": "same image as d"},
            {"key": "z", "shard": "000001", "reason": "duplicate", "detail": "same URL as a"},
        ],
        repeated,
    )
    funnels = dataset_funnel(
        *([s[name] for s in (first, second)] for name in ("stats", "captions", "phase1", "phase2")),
        [first["h5"], second["h5"]],
        repeated,
    )
    assert [f.counts["phase2"] for f in funnels] == [3, 2]
    assert [f.counts["distinct"] for f in funnels] == [2, 1]
    total = total_funnel(funnels)
    assert ("duplicates and leaks", "leak", 1, 20.0) in failure_rows(total)
    assert ("duplicates and leaks", "duplicate", 1, 20.0) in failure_rows(total)


def test_funnel_page_and_figure_are_self_contained(tmp_path: Path) -> None:
    train = shard_files(tmp_path / "train", "000000", FATES, {"http_status": 3})
    held_out = shard_files(tmp_path / "eval", "000000", {"z": "ok"}, {}, h5=False)
    page, figure = tmp_path / "report" / "funnel.html", tmp_path / "report" / "funnel.png"
    total = write_funnel_report(funnel_of([train]), "photos", page, figure)
    assert total.counts["h5_phase2"] == 2
    text = page.read_text(encoding="utf-8")
    assert "<title>photos: funnel and failures</title>" in text
    assert "in H5 (phase 2)" in text and "discarded_too_long" in text and "http_status" in text
    assert re.search(r"<td>% of rows</td><td>100.0 %</td><td>66.7 %</td>", text)
    assert "http" not in text.replace("http_status", "") and "<script" not in text
    assert figure.read_bytes().startswith(PNG)

    # A dataset that is not packed into HDF5 files: those stages show a dash.
    [funnel] = funnel_of([held_out])
    assert funnel.counts["h5_phase1"] is None and funnel.counts["phase2"] == 1
    write_funnel_report([funnel], "held_out", page, figure)
    text = page.read_text(encoding="utf-8")
    # Two H5 stages and "distinct" (not looked for here) in the shard, total and % rows.
    assert text.count("<td class='n'>&ndash;</td>") == 3 * 3
    assert "No failures" in text


def test_funnel_errors_name_the_file_and_field(tmp_path: Path) -> None:
    files = shard_files(tmp_path, "000000", FATES, {})
    stats = json.loads(files["stats"].read_text())
    write_json(files["stats"], {**stats, "ok": 7, "rows_in": 7})
    with pytest.raises(ReportError, match=r"captions/000000.parquet: 6 rows, .*ok = 7"):
        funnel_of([files])

    files = shard_files(tmp_path, "000000", FATES, {})
    write_json(
        files["h5"],
        {"phase1": {"n_examples": 9, "discarded_too_long": 0}, "phase2": {"n_examples": 1}},
    )
    with pytest.raises(ReportError, match=r"h5/000000.json: phase1.n_examples 9"):
        funnel_of([files])
    write_json(files["h5"], {"phase1": {"n_examples": "many"}})
    with pytest.raises(ReportError, match=r"h5/000000.json: field phase1.n_examples"):
        funnel_of([files])

    files = shard_files(tmp_path, "000000", FATES, {})
    write_rows_parquet(files["phase2"], [], CAPTION_SCHEMA)  # a caption file in its place
    with pytest.raises(ReportError, match=r"phase2/000000.parquet: .*no column 'phase2_failure'"):
        funnel_of([files])

    # Phase 1 keeps a sample whose caption failed: the files do not belong together.
    files = shard_files(tmp_path, "000000", FATES, {})
    fresh = shard_files(tmp_path / "other", "000000", dict.fromkeys(FATES, "ok"), {})
    files["phase1"] = fresh["phase1"]
    with pytest.raises(ReportError, match=r"other/phase1/000000.parquet: column 'failure' .*'b'"):
        funnel_of([files])

    with pytest.raises(ReportError, match="one file per shard"):
        dataset_funnel([files["stats"]], [], [], [])


def test_caption_lengths_count_words_and_leave_failed_captions_out(tmp_path: Path) -> None:
    files = shard_files(tmp_path, "000000", FATES, {})
    lengths = caption_lengths([files["captions"]])
    assert lengths.vlm == [7] * 5  # "The image shows a red a box."
    assert lengths.web == [5] * 6 and lengths.failed == 1
    out = tmp_path / "lengths.png"
    write_caption_lengths([files["captions"]], "photos", out)
    assert out.read_bytes().startswith(PNG)


def test_attribute_stats_count_final_attributes_of_kept_images(tmp_path: Path) -> None:
    files = shard_files(tmp_path, "000000", FATES, {})
    stats = attribute_stats([files["phase2"]])
    assert stats.images == 3  # a, d and e (too long only for the HDF5 file)
    assert stats.frequencies["red"] == 3 and stats.frequencies["lid"] == 2  # d's phase 2 failed
    assert sorted(stats.per_image) == [2, 3, 3] and stats.phase1_per_image == [2] * 3
    assert most_frequent(stats.frequencies, 3) == [("red", 3), ("lid", 2), ("a box", 1)]
    assert most_frequent(Counter({"b": 1, "a": 1, "c": 2}), 5) == [("c", 2), ("a", 1), ("b", 1)]
    top, per_image = tmp_path / "top.png", tmp_path / "per_image.png"
    write_attribute_figures([files["phase2"]], "photos", 50, top, per_image)
    assert top.read_bytes().startswith(PNG) and per_image.read_bytes().startswith(PNG)


def test_parse_failures_by_phase_and_reason_with_example_answers(tmp_path: Path) -> None:
    first = shard_files(tmp_path, "000000", FATES, {})
    second = shard_files(tmp_path, "000001", {"g": "no_items", "h": "no_items", "i": "empty"}, {})
    failures = parse_failures(
        [first["phase1"], second["phase1"]], [first["phase2"], second["phase2"]], examples=2
    )
    summary = [(f.phase, f.reason, f.count, f.answers) for f in failures]
    # Phase 1 got 8 prompts (b's caption failed); phase 2 got 3 (a, d and e).
    assert summary == [
        ("phase 1", "no_items", 3, 8),
        ("phase 1", "empty_answer", 1, 8),
        ("phase 1", "generation_error", 1, 8),
        ("phase 2", "refused", 1, 3),
    ]
    assert failures[0].examples == [("c", "I see."), ("g", "I see.")]  # at most 2
    assert failures[2].examples == [("f", "generation_error: stopped")]  # no answer: the error
    out = tmp_path / "parse_failures.html"
    write_parse_failures_page(failures, "photos", out)
    text = out.read_text(encoding="utf-8")
    assert "Sorry, I can&#x27;t." in text and "37.5 %" in text  # 3 of 8
    assert "<b>i</b><pre class='answer'>(empty answer)</pre>" in text
    assert "http" not in text and "<script" not in text
    write_parse_failures_page([], "photos", out)
    assert "No parse failures" in out.read_text(encoding="utf-8")


def test_metrics_page_is_an_html_table_and_bad_tables_are_named(tmp_path: Path) -> None:
    tsv = tmp_path / "metrics.tsv"
    tsv.write_text(
        "dataset\tdecoding\tk\trecall\tprecision\tf1\tstrict_f1\tn_images\n"
        "photos_eval\tgreedy\t5\t0.31\t0.39\t0.34\t0.0\t15\n"
        "photos_eval\tgreedy\t10\t0.4\t0.3\t0.34\t0.125\t15\n",
        encoding="utf-8",
    )
    out = tmp_path / "metrics.html"
    write_metrics_page(tsv, out)
    text = out.read_text(encoding="utf-8")
    assert text.count("<tr>") == 3 and "<th>strict_f1</th>" in text
    assert (
        "<td>photos_eval</td><td>greedy</td><td class='n'>10</td><td class='n'>0.4</td>"
        "<td class='n'>0.3</td><td class='n'>0.34</td><td class='n'>0.125</td>"
        "<td class='n'>15</td>"
    ) in text
    assert "http" not in text and "<script" not in text
    tsv.write_text("dataset\tk\trecall\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"metrics.tsv: no column 'precision'"):
        read_metrics(tsv)
    tsv.write_text(
        "dataset\tk\trecall\tprecision\tf1\tn_images\nd\t5\tnan?\t1\t1\t1\n", encoding="utf-8"
    )
    with pytest.raises(ReportError, match=r"metrics.tsv, line 2: column 'recall'"):
        read_metrics(tsv)


def test_training_figure_has_a_row_per_phase_and_names_a_bad_log_line(tmp_path: Path) -> None:
    runs = {}
    for phase in (1, 2):
        run = tmp_path / f"phase{phase}"
        run.mkdir()
        lines = [
            json.dumps({"phase": phase, "step": s, "loss": 6 - s / 10, "lr": 1e-3 / phase})
            for s in range(1, 6)
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        runs[f"phase {phase}"] = run
    out = tmp_path / "loss.png"
    plot_training(runs, out)
    from PIL import Image

    with Image.open(out) as image:
        width, height = image.size
    assert height > width / 2  # two rows of axes, not one
    (tmp_path / "phase2" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n')
    with pytest.raises(ValueError, match=r"phase2/metrics.jsonl, line 1: .*step, loss, lr"):
        plot_training(runs, out)
