"""Pages for looking at what the models did: a caption gallery and dialog samples.

Both are single self-contained HTML files (images inlined as data: URIs, no scripts, no
network), shown in ``snakemake --report`` under "Captions" and "Attributes":

* the gallery: the first N images of a shard with their web caption, VLM caption and
  final attributes;
* the dialog samples: the first N prompt / answer pairs of each attribute phase, with
  the prompt rebuilt from the same template and inputs the phase used, and what the
  parser made of each answer.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from vlmflow.core.attribute_text import clean_vlm_caption, phase1_prompt, phase2_prompt
from vlmflow.core.io import atomic_open, html_page, read_parquet_rows
from vlmflow.core.shards import iter_samples

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }
img { max-width: 224px; max-height: 224px; }
pre { white-space: pre-wrap; margin: 0; max-width: 60em; }
.failure { color: #b00; }
"""


def _text(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _failure(row: dict[str, Any] | None) -> str:
    if row is None:
        return "<span class='failure'>missing</span>"
    failure = row.get("failure")
    return f"<span class='failure'>{_text(failure)}</span>" if failure else ""


def write_gallery(
    shard_tar: str | Path,
    captions_parquet: str | Path,
    attributes_parquet: str | Path,
    out_html: str | Path,
    count: int,
    title: str,
) -> int:
    """The first ``count`` samples of a shard with their captions and attributes."""
    captions = {row["key"]: row for row in read_parquet_rows(captions_parquet)}
    attributes = {row["key"]: row for row in read_parquet_rows(attributes_parquet)}
    rows = []
    for number, sample in enumerate(iter_samples(shard_tar)):
        if number >= count:
            break
        mime = "image/webp" if sample.image_ext == "webp" else "image/jpeg"
        data = base64.b64encode(sample.image_data).decode("ascii")
        caption = captions.get(sample.key)
        final = attributes.get(sample.key)
        labels = ", ".join(final["attributes"]) if final else ""
        rows.append(
            "<tr>"
            f"<td><img src='data:{mime};base64,{data}' alt='{_text(sample.key)}'>"
            f"<br>{_text(sample.key)}</td>"
            f"<td>{_text(sample.web_caption)}</td>"
            f"<td>{_text(caption['vlm_caption'] if caption else '')} {_failure(caption)}</td>"
            f"<td>{_text(labels)} {_failure(final)}</td>"
            "</tr>"
        )
    table = (
        "<table><tr><th>image</th><th>web caption</th><th>VLM caption</th>"
        "<th>final attributes</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )
    with atomic_open(out_html) as handle:
        handle.write(html_page(title, table, STYLE))
    return len(rows)


def write_dialogs(
    phase1_parquet: str | Path,
    phase2_parquet: str | Path,
    phase1_template: str,
    phase2_template: str,
    out_html: str | Path,
    count: int,
    title: str,
) -> int:
    """The first ``count`` prompt/answer pairs of each phase that reached the LLM."""
    sections = []
    phase1 = [row for row in read_parquet_rows(phase1_parquet) if row["raw_answer"] is not None]
    pairs = [
        (
            row["key"],
            phase1_prompt(
                phase1_template, row["web_caption"], clean_vlm_caption(row["vlm_caption"])
            ),
            row["raw_answer"],
            row["attributes"],
            row["failure"],
        )
        for row in phase1[:count]
    ]
    sections.append(_dialog_table("Phase 1: objects and attributes from the captions", pairs))
    phase2 = [row for row in read_parquet_rows(phase2_parquet) if row["raw_answer"] is not None]
    pairs = [
        (
            row["key"],
            phase2_prompt(phase2_template, row["phase1_attributes"]),
            row["raw_answer"],
            row["phase2_attributes"],
            row["failure"],
        )
        for row in phase2[:count]
    ]
    sections.append(_dialog_table("Phase 2: parts of compound phrases", pairs))
    with atomic_open(out_html) as handle:
        handle.write(html_page(title, "\n".join(sections), STYLE))
    return len(phase1[:count]) + len(phase2[:count])


def _dialog_table(heading: str, pairs: list[tuple[str, str, str, list[str], str | None]]) -> str:
    rows = [
        "<tr>"
        f"<td>{_text(key)}</td><td><pre>{_text(prompt)}</pre></td>"
        f"<td><pre>{_text(answer)}</pre></td>"
        f"<td>{_text(', '.join(parsed))}"
        + (f" <span class='failure'>{_text(failure)}</span>" if failure else "")
        + "</td></tr>"
        for key, prompt, answer, parsed, failure in pairs
    ]
    return (
        f"<h2>{html.escape(heading)}</h2><table><tr><th>key</th><th>prompt</th>"
        "<th>answer</th><th>parsed</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )
