"""Statistics and pages of the Snakemake report, computed from the stages' own outputs.

Every stage already records what became of each sample, so nothing here reads an image
or reruns a model:

* ingest: the shard's stats json (rows in, ``ok``, failures by reason);
* caption, attributes phase 1 and phase 2: the ``failure`` column of each shard's parquet
  (a sample that failed an earlier stage carries that failure on), plus phase 2's
  ``phase2_failure``: why a phase-2 answer added nothing to a sample that is kept;
* h5: the shard's json (examples written per phase, samples discarded as too long).

From those it builds a dataset's funnel (rows, downloaded, captioned, phase 1, phase 2,
in the HDF5 files) with the failures by stage and reason, the caption lengths, the
attribute frequencies, the attributes per image and the parse failures of both LLM
phases; and it renders the eval metrics as a table. Pages are self-contained HTML:
inline CSS, no scripts, no external resources.
"""

from __future__ import annotations

import csv
import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.core.contract import (
    CAPTION_FAILED,
    FUNNEL_STAGES,
    PHASE2_ANSWER,
    Funnel,
    ReportError,
    failure_rows,
    read_columns,
    total_funnel,
)
from vlmflow.core.io import atomic_open, failure_reason, html_page
from vlmflow.reporting.plots import (
    plot_attributes_per_image,
    plot_caption_lengths,
    plot_funnel,
    plot_top_attributes,
)

# The columns of metrics.tsv the report needs, and those that are not numbers.
METRIC_COLUMNS = ("dataset", "k", "recall", "precision", "f1", "n_images")
TEXT_METRIC_COLUMNS = frozenset({"dataset", "decoding"})

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; }
tr.first td { border-top: 2px solid #888; }
pre.answer { background: #f4f4f4; padding: 2px 4px; margin-bottom: 6px; }
pre { white-space: pre-wrap; margin: 0; max-width: 60em; }
.kept { color: #666; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td class='n'>&ndash;</td>"
    if isinstance(value, int | float):
        return f"<td class='n'>{html.escape(str(value))}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], totals: Sequence[Sequence[Any]] = ()
) -> str:
    """A table; numbers right-aligned, None shown as a dash, bold total rows at the end."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = ["<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows]
    body += [
        f"<tr class='{'total first' if number == 0 else 'total'}'>"
        + "".join(_cell(value) for value in row)
        + "</tr>"
        for number, row in enumerate(totals)
    ]
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def write_funnel_page(funnels: Sequence[Funnel], dataset: str, out_html: str | Path) -> None:
    """The funnel per shard with a total row, and the failures by stage and reason."""
    total = total_funnel(funnels)
    header = ["shard", *FUNNEL_STAGES.values()]
    rows = [[f.shard, *f.counts.values()] for f in funnels]
    rows_in = total.counts["rows"] or 0
    share = [
        f"{100.0 * count / rows_in:.1f} %" if count is not None and rows_in else None
        for count in total.counts.values()
    ]
    funnel_table = html_table(
        header, rows, [[total.shard, *total.counts.values()], ["% of rows", *share]]
    )
    failures = failure_rows(total)
    if failures:
        failure_table = html_table(
            ["stage", "reason", "samples", "% of the stage's input"],
            [
                [stage, reason, count, f"{share:.1f} %" if share is not None else None]
                for stage, reason, count, share in failures
            ],
        )
    else:
        failure_table = "<p>No failures: every row reached every stage.</p>"
    body = (
        "<h2>Samples left after each stage</h2>\n"
        f"{funnel_table}\n"
        "<p>&ndash; : the stage does not run for this dataset (only train datasets are packed "
        "into HDF5 files). <em>distinct</em>: phase 2's samples that repeat no earlier image "
        "of the dataset and, for an eval dataset, no train image (duplicates.tsv lists the "
        "others); the exports and eval take these, the H5 files keep every shard's own.</p>\n"
        "<h2>Failures by stage and reason</h2>\n"
        f"<p>Each sample is counted once, at the stage that dropped it. The "
        f"<span class='kept'>{html.escape(PHASE2_ANSWER)}</span> rows are phase-2 answers "
        "that added nothing: those samples keep their phase-1 attributes.</p>\n"
        f"{failure_table}"
    )
    with atomic_open(out_html) as handle:
        handle.write(html_page(f"{dataset}: funnel and failures", body, STYLE))


# --- captions and attributes -------------------------------------------------------------


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class CaptionLengths:
    """Words per caption: the VLM's (failed captions left out) and the source's."""

    vlm: list[int] = field(default_factory=list)
    web: list[int] = field(default_factory=list)
    failed: int = 0
    without_web_caption: int = 0


def caption_lengths(paths: Sequence[str | Path]) -> CaptionLengths:
    lengths = CaptionLengths()
    for path in paths:
        for row in read_columns(path, ["vlm_caption", "web_caption", "failure"], "caption"):
            if row["failure"] is not None or row["vlm_caption"] is None:
                lengths.failed += 1
            else:
                lengths.vlm.append(word_count(row["vlm_caption"]))
            if row["web_caption"] is None:
                lengths.without_web_caption += 1
            else:
                lengths.web.append(word_count(row["web_caption"]))
    return lengths


@dataclass
class AttributeStats:
    """Final attributes of the samples kept after phase 2."""

    frequencies: Counter[str] = field(default_factory=Counter)  # attribute -> images
    per_image: list[int] = field(default_factory=list)  # final attributes per image
    phase1_per_image: list[int] = field(default_factory=list)  # phase-1 ones, same images
    images: int = 0


def attribute_stats(phase2_paths: Sequence[str | Path]) -> AttributeStats:
    stats = AttributeStats()
    columns = ["key", "attributes", "phase1_attributes", "failure"]
    for path in phase2_paths:
        for row in read_columns(path, columns, "attributes phase 2"):
            if row["failure"] is not None:
                continue
            final = row["attributes"] or []
            stats.images += 1
            # An attribute counts once per image, however often the answer repeated it.
            stats.frequencies.update(set(final))
            stats.per_image.append(len(final))
            stats.phase1_per_image.append(len(row["phase1_attributes"] or []))
    return stats


def most_frequent(frequencies: Counter[str], top: int) -> list[tuple[str, int]]:
    """The ``top`` most frequent; ties in alphabetical order, so the figure is stable."""
    return sorted(frequencies.items(), key=lambda item: (-item[1], item[0]))[:top]


@dataclass
class ParseFailure:
    """Answers of one phase that gave no attributes, for one reason."""

    phase: str
    reason: str
    count: int
    answers: int  # answers the phase got (prompts sent to the LLM)
    examples: list[tuple[str, str]]  # (key, raw answer, or the error when there is none)


def parse_failures(
    phase1_paths: Sequence[str | Path], phase2_paths: Sequence[str | Path], examples: int
) -> list[ParseFailure]:
    """Phase 1: failed answers of samples with a caption (a failed caption is no prompt).
    Phase 2: ``phase2_failure`` of the samples phase 2 asked about (they are kept)."""
    found: dict[tuple[str, str], ParseFailure] = {}
    answers = {"phase 1": 0, "phase 2": 0}

    def add(phase: str, key: str, failure: str, raw: str | None) -> None:
        reason = failure_reason(failure)
        entry = found.setdefault((phase, reason), ParseFailure(phase, reason, 0, 0, examples=[]))
        entry.count += 1
        if len(entry.examples) < examples:
            entry.examples.append((key, raw if raw is not None else failure))

    for path in phase1_paths:
        for row in read_columns(path, ["key", "raw_answer", "failure"], "attributes phase 1"):
            if row["failure"] == CAPTION_FAILED:
                continue
            answers["phase 1"] += 1
            if row["failure"] is not None:
                add("phase 1", row["key"], row["failure"], row["raw_answer"])
    for path in phase2_paths:
        columns = ["key", "raw_answer", "phase2_failure"]
        for row in read_columns(path, columns, "attributes phase 2"):
            if row["raw_answer"] is None and row["phase2_failure"] is None:
                continue  # not asked: the sample failed before phase 2
            answers["phase 2"] += 1
            if row["phase2_failure"] is not None:
                add("phase 2", row["key"], row["phase2_failure"], row["raw_answer"])
    result = sorted(found.values(), key=lambda f: (f.phase, -f.count, f.reason))
    for entry in result:
        entry.answers = answers[entry.phase]
    return result


def write_parse_failures_page(
    failures: Sequence[ParseFailure], dataset: str, out_html: str | Path
) -> None:
    if failures:
        rows = []
        for entry in failures:
            shown = "".join(
                f"<b>{html.escape(key)}</b><pre class='answer'>{html.escape(_shorten(text))}</pre>"
                for key, text in entry.examples
            )
            share = f"{100.0 * entry.count / entry.answers:.1f} %" if entry.answers else "&ndash;"
            rows.append(
                f"<tr><td>{html.escape(entry.phase)}</td><td>{html.escape(entry.reason)}</td>"
                f"<td class='n'>{entry.count}</td><td class='n'>{share}</td>"
                f"<td>{shown}</td></tr>"
            )
        table = (
            "<table><tr><th>phase</th><th>reason</th><th>failed answers</th>"
            "<th>% of the phase's answers</th><th>examples (key, raw answer)</th></tr>\n"
            + "\n".join(rows)
            + "\n</table>"
        )
    else:
        table = "<p>No parse failures: every answer of both phases gave attributes.</p>"
    body = (
        "<p>Answers the parser got no attribute from (<code>empty_answer</code>, "
        "<code>refused</code>, <code>truncated</code>: cut off inside a reasoning block, "
        "code fence or JSON array; <code>unparsed</code>: JSON that holds no list; "
        "<code>no_items</code>: nothing usable) or that were never generated "
        "(<code>generation_error</code>, with the error instead of an answer). A phase-1 "
        "failure drops the sample; after a phase-2 failure the sample keeps its phase-1 "
        f"attributes.</p>\n{table}"
    )
    with atomic_open(out_html) as handle:
        handle.write(html_page(f"{dataset}: attribute parse failures", body, STYLE))


def _shorten(text: str, limit: int = 400, lines: int = 12) -> str:
    """An answer as shown: at most ``lines`` lines and ``limit`` characters."""
    if not text.strip():
        return "(empty answer)"
    kept = text.splitlines()[:lines]
    shown = "\n".join(kept)[:limit]
    return shown if shown == text else shown + " [...]"


# --- eval --------------------------------------------------------------------------------


def read_metrics(metrics_tsv: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """The metrics table's columns and rows (one per eval dataset, decoding and k).

    The columns of METRIC_COLUMNS must be there (other columns, such as the strict
    metrics, are shown as they come); every column but ``dataset`` and ``decoding``
    holds numbers.
    """
    with open(metrics_tsv, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        header = list(reader.fieldnames or [])
        missing = [column for column in METRIC_COLUMNS if column not in header]
        if missing:
            raise ReportError(
                f"{metrics_tsv}: no column {missing[0]!r} (columns: {', '.join(header)})"
            )
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        for column in header:
            if column in TEXT_METRIC_COLUMNS:
                continue
            try:
                float(row[column])
            except (TypeError, ValueError):
                raise ReportError(
                    f"{metrics_tsv}, line {number}: column {column!r}: expected a number, "
                    f"got {row[column]!r}"
                ) from None
    return header, rows


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def write_metrics_page(metrics_tsv: str | Path, out_html: str | Path) -> None:
    """metrics.tsv as an HTML table, every column in its order."""
    header, rows = read_metrics(metrics_tsv)
    table = html_table(
        header,
        [[row[c] if c in TEXT_METRIC_COLUMNS else _number(row[c]) for c in header] for row in rows],
    )
    body = (
        "<p>Per eval dataset, decoding and k: soft recall, precision and F1 of the top-k "
        "predicted labels against the phase-2 attributes of each image (all-MiniLM-L6-v2 "
        "cosine similarity) and the strict ones (exact match after lower-casing and "
        f"singularising), averaged over <code>n_images</code> images.</p>\n{table}"
    )
    with atomic_open(out_html) as handle:
        handle.write(html_page("Eval: R/P/F1@k per dataset and k", body, STYLE))


# --- the report items, as the rules write them --------------------------------------------


def write_funnel_report(
    funnels: Sequence[Funnel], dataset: str, out_html: str | Path, out_png: str | Path
) -> Funnel:
    """The funnel page and figure of a dataset; returns the total funnel."""
    total = total_funnel(funnels)
    write_funnel_page(funnels, dataset, out_html)
    plot_funnel(
        {FUNNEL_STAGES[stage]: count for stage, count in total.counts.items()},
        [(stage, reason, count) for stage, reason, count, _ in failure_rows(total)],
        out_png,
        dataset,
    )
    return total


def write_caption_lengths(
    caption_paths: Sequence[str | Path], dataset: str, out_png: str | Path
) -> CaptionLengths:
    lengths = caption_lengths(caption_paths)
    notes = []
    if lengths.failed:
        notes.append(f"{lengths.failed} failed VLM captions left out")
    if lengths.without_web_caption:
        notes.append(f"{lengths.without_web_caption} samples without a web caption")
    plot_caption_lengths(
        lengths.vlm,
        lengths.web,
        out_png,
        dataset,
        f" ({'; '.join(notes)})" if notes else "",
    )
    return lengths


def write_attribute_figures(
    phase2_paths: Sequence[str | Path],
    dataset: str,
    top: int,
    out_top_png: str | Path,
    out_per_image_png: str | Path,
) -> AttributeStats:
    stats = attribute_stats(phase2_paths)
    plot_top_attributes(most_frequent(stats.frequencies, top), stats.images, out_top_png, dataset)
    plot_attributes_per_image(stats.per_image, stats.phase1_per_image, out_per_image_png, dataset)
    return stats
