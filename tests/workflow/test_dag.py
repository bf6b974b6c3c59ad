"""The whole DAG on a subset of the sample data: outputs, reruns, report.

The tests of this module run in order on one work folder: a full run, then reruns.
"""

from __future__ import annotations

import contextlib
import csv
import html as htmllib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pyarrow.parquet as pq
import pytest

from tests.workflow.conftest import (
    REPO,
    job_counts,
    job_outputs,
    load_config,
    run_chromium,
    run_readme,
    save_config,
    snakemake,
)
from vlmflow.core.contract import read_duplicates

pytestmark = pytest.mark.workflow

TRAIN, EVAL = "photos", "photos_eval"
TRAIN_SHARDS = ["000000", "000001"]

# Downstream of one shard's captions: its own chain, then everything that aggregates.
ONE_SHARD_CHAIN = {
    "caption": 1,
    "attributes_phase1": 1,
    "attributes_phase2": 1,
    "h5": 1,
    "h5_index": 1,
    # The dataset's indexes of its captions, phase-1, phase-2 and h5 files.
    "shard_index": 4,
    "train_phase1": 1,
    "train_phase2": 1,
    "evaluate": 1,
    "loss_plot": 1,
    "metrics_table": 1,
    "metrics_page": 1,
    # The dataset's report items that count every shard.
    "funnel": 1,
    "caption_lengths": 1,
    "attribute_stats": 1,
    "parse_failures": 1,
    # The dataset's exports read every shard's final samples.
    "export_llava": 1,
    "export_hf": 1,
    "all": 1,
}


def contract_files(workdir: Path) -> list[Path]:
    files = []
    for dataset, shards in ((TRAIN, TRAIN_SHARDS), (EVAL, ["000000"])):
        for shard in shards:
            files += [
                workdir / f"results/{dataset}/shards/{shard}.tar",
                workdir / f"results/{dataset}/shards/{shard}.stats.json",
                workdir / f"results/{dataset}/captions/{shard}.parquet",
                workdir / f"results/{dataset}/attributes/phase1/{shard}.parquet",
                workdir / f"results/{dataset}/attributes/phase2/{shard}.parquet",
                workdir / f"results/{dataset}/report/gallery.html",
                workdir / f"results/{dataset}/report/dialogs.html",
                workdir / f"results/{dataset}/report/funnel.html",
                workdir / f"results/{dataset}/report/funnel.png",
                workdir / f"results/{dataset}/report/caption_lengths.png",
                workdir / f"results/{dataset}/report/top_attributes.png",
                workdir / f"results/{dataset}/report/attributes_per_image.png",
                workdir / f"results/{dataset}/report/parse_failures.html",
                workdir / f"results/export/{dataset}/hf/README.md",
                workdir / f"results/{dataset}/duplicates.tsv",
                workdir / f"logs/caption/{dataset}/{shard}.log",
                workdir / f"results/benchmarks/caption/{dataset}/{shard}.tsv",
            ]
    for shard in TRAIN_SHARDS:
        files += [
            workdir / f"results/{TRAIN}/h5/phase1/{shard}.h5",
            workdir / f"results/{TRAIN}/h5/phase2/{shard}.h5",
        ]
    files += [
        workdir / f"results/{TRAIN}/h5/metadata.json",
        workdir / f"results/{TRAIN}/h5/data_params.json",
        workdir / f"results/{TRAIN}/h5/phase1/data_params.json",
        workdir / f"results/{TRAIN}/h5/phase2/data_params.json",
        workdir / f"results/export/{TRAIN}/llava.json",
        workdir / f"results/export/{TRAIN}/llava.md",
        workdir / "results/train/phase1/config.json",
        workdir / "results/train/phase1/metrics.jsonl",
        workdir / "results/train/phase2/model.safetensors",
        workdir / "results/train/phase2/metrics.jsonl",
        workdir / "results/train/loss.png",
        workdir / "results/eval/metrics.tsv",
        workdir / "results/eval/metrics.html",
    ]
    return files


@pytest.fixture
def finished(workdir: Path) -> Path:
    """The demo run, finished in the module's folder: made by the first test that needs
    it and a no-op for the others (each restores what it changes), so that every test
    also passes alone (`pytest tests/workflow/test_dag.py::<test>`)."""
    run = snakemake(workdir, "all")
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir


def test_full_run_writes_every_file_of_the_data_contract(workdir: Path) -> None:
    run = run_readme(workdir, "snakemake --profile profiles/local all")
    assert run.returncode == 0, run.stderr[-4000:]
    missing = [str(p.relative_to(workdir)) for p in contract_files(workdir) if not p.exists()]
    assert not missing
    with open(workdir / "results/eval/metrics.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["dataset"], r["k"]) for r in rows] == [(EVAL, "5"), (EVAL, "10")]
    assert all(0.0 <= float(r["f1"]) <= 1.0 and int(r["n_images"]) > 0 for r in rows)
    captions = pq.read_table(workdir / f"results/{TRAIN}/captions/000000.parquet").to_pylist()
    assert len(captions) == 8
    with h5py.File(workdir / f"results/{TRAIN}/h5/phase1/000000.h5") as f:
        assert f["data"].shape[1] == 4 and f["data"].dtype == "int32"
        assert f.attrs["n_examples"] == f["data"].shape[0] == f["img_path"].shape[0]


def final_rows(workdir: Path, dataset: str, shards: list[str]) -> dict[str, dict[str, Any]]:
    """The samples attributes phase 2 kept, less duplicates.tsv's, by key in shard order."""
    left_out = read_duplicates(workdir / f"results/{dataset}/duplicates.tsv")
    final = {}
    for shard in shards:
        path = workdir / f"results/{dataset}/attributes/phase2/{shard}.parquet"
        for row in pq.read_table(path).to_pylist():
            if row["failure"] is None and (shard, row["key"]) not in left_out:
                final[row["key"]] = row
    return final


@pytest.mark.usefixtures("finished")
def test_llava_export_is_the_phase2_data_with_its_images(workdir: Path) -> None:
    from transformers import AutoTokenizer

    final = final_rows(workdir, TRAIN, TRAIN_SHARDS)
    assert final
    samples = json.loads((workdir / f"results/export/{TRAIN}/llava.json").read_text())
    assert [sample["id"] for sample in samples] == list(final)
    image_root = workdir / f"results/{TRAIN}/h5/images"
    for sample in samples:
        assert (image_root / sample["image"]).is_file(), sample["image"]
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>")
        assert sum(turn["value"].count("<image>") for turn in sample["conversations"]) == 1
        assert gpt["value"] == ", ".join(final[sample["id"]]["attributes"])
    assert str(Path("results", TRAIN, "h5", "images")) in (
        workdir / f"results/export/{TRAIN}/llava.md"
    ).read_text(encoding="utf-8")
    # The answer is what the phase-2 H5 row of the same sample trains on (vicuna_v1: a
    # space after "ASSISTANT:", then the answer, then EOS).
    metadata = json.loads((workdir / f"results/{TRAIN}/h5/metadata.json").read_text())
    sample = next(s for s in samples if "phase2" in metadata[s["id"]])
    location = metadata[sample["id"]]["phase2"]
    with h5py.File(workdir / f"results/{TRAIN}/h5" / location["file"]) as f:
        rows = f["data"][location["row"]]
        assert f["img_path"][location["row"], 0].decode() == sample["image"]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "results/models/demo-lm")
    trained = rows[2][rows[1] == 1][:-1]  # labels where the loss mask is 1, EOS dropped
    assert tokenizer.decode(trained) == " " + sample["conversations"][1]["value"]


@pytest.mark.usefixtures("finished")
def test_hf_export_loads_with_the_final_rows_and_its_card(workdir: Path) -> None:
    import datasets

    for dataset, shards in ((TRAIN, TRAIN_SHARDS), (EVAL, ["000000"])):
        final = final_rows(workdir, dataset, shards)
        folder = workdir / f"results/export/{dataset}/hf"
        loaded = datasets.load_from_disk(str(folder))
        assert loaded["key"] == list(final)
        assert loaded["attributes"] == [list(row["attributes"]) for row in final.values()]
        assert loaded["phase2_model"] == [row["model"] for row in final.values()]
        assert loaded[0]["image"].size[0] > 0
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert card.startswith("---\nlicense: other\n")
        models = set(loaded["caption_model"]) | set(loaded["phase1_model"])
        for model in models | set(loaded["phase2_model"]) | set(loaded["caption_engine"]):
            assert model in card, model
        assert "| revision |" in card and "local folder" in card  # the demo models' revision
        rows_in = 0
        for shard in shards:
            stats = json.loads(
                (workdir / f"results/{dataset}/shards/{shard}.stats.json").read_text()
            )
            rows_in += stats["rows_in"]
        assert f"| rows | {rows_in} |" in card
        assert f"| **in this dataset** | **{len(final)}** |" in card
        assert f"| distinct (exported, evaluated) | {len(final)} |" in card
        assert "keep their owners' licences" in card


@pytest.mark.usefixtures("finished")
def test_cerebras_data_params_sit_beside_each_phase_h5_files(workdir: Path) -> None:
    summary = json.loads((workdir / f"results/{TRAIN}/h5/data_params.json").read_text())
    for phase in ("phase1", "phase2"):
        folder = workdir / f"results/{TRAIN}/h5/{phase}"
        params = json.loads((folder / "data_params.json").read_text())
        for section, keys in {
            "processing": ("max_seq_length", "vocab_size", "pad_id", "eos_id", "bos_id"),
            "dataset": ("num_patches", "image_start_idx"),
            "post-process": ("n_examples", "num_tokens", "loss_valid_tokens"),
        }.items():
            missing = [key for key in keys if params[section].get(key) is None]
            assert not missing, (phase, section, missing)
        assert params["features"] == ["input_ids", "loss_mask", "labels", "key_padding_mask"]
        rows = 0
        for shard in TRAIN_SHARDS:
            with h5py.File(folder / f"{shard}.h5") as f:
                rows += f["data"].shape[0]
                first_pad = int((f["data"][0, 0] == params["processing"]["pad_id"]).argmax())
        assert params["post-process"]["n_examples"] == rows > 0
        assert params["dataset"]["image_start_idx"] == first_pad
        assert params["dataset"]["image_start_idx"] == summary["image_patch_start_idx"][phase]
        assert params["processing"]["max_seq_length"] == summary["settings"]["max_seq_len"]


@pytest.mark.usefixtures("finished")
def test_every_long_running_job_logs_a_progress_bar(workdir: Path) -> None:
    """tqdm bars in the job logs, as lines (not carriage returns), ending at 100 %."""
    logs = {
        "ingest": f"logs/ingest/{TRAIN}/000000.log",
        "caption": f"logs/caption/{TRAIN}/000000.log",
        "attributes phase1": f"logs/attributes_phase1/{TRAIN}/000000.log",
        "attributes phase2": f"logs/attributes_phase2/{TRAIN}/000000.log",
        "h5": f"logs/h5/{TRAIN}/000000.log",
        "train phase 1": "logs/train/phase1.log",
        "train phase 2": "logs/train/phase2.log",
        "eval": f"logs/evaluate/{EVAL}.log",
    }
    for stage, relative in logs.items():
        text = (workdir / relative).read_text(encoding="utf-8")
        assert "\r" not in text, relative
        bars = [line for line in text.splitlines() if "100%|" in line]
        assert bars, f"{stage}: no finished progress bar in {relative}"


@pytest.mark.usefixtures("finished")
def test_second_run_has_nothing_to_do(workdir: Path) -> None:
    dry = run_readme(workdir, "snakemake --profile profiles/local -n all")
    assert dry.returncode == 0, dry.stderr[-4000:]
    assert job_counts(dry.stdout + dry.stderr) == {}


@pytest.mark.usefixtures("finished")
def test_any_missing_per_shard_file_is_made_again(workdir: Path) -> None:
    # Snakemake remakes a missing file only for a target or a job that has to run:
    # per-dataset steps reading every shard's files do not bring a deleted one back
    # while their own outputs are up to date. `all` has to list each kind.
    producers = {
        f"results/{TRAIN}/shards/000000.tar": "ingest",
        f"results/{EVAL}/shards/000000.stats.json": "ingest",
        f"results/{EVAL}/captions/000000.parquet": "caption",
        f"results/{TRAIN}/attributes/phase1/000001.parquet": "attributes_phase1",
        f"results/{EVAL}/attributes/phase2/000000.parquet": "attributes_phase2",
        f"results/{TRAIN}/h5/phase1/000001.h5": "h5",
        f"results/{TRAIN}/h5/phase2/000000.h5": "h5",
        f"results/{TRAIN}/h5/shards/000001.json": "h5",
        f"results/{TRAIN}/h5/images/000000": "h5",
    }
    # One file at a time: with several gone, one shard's remade chain would hide a
    # file nothing downstream asks for.
    for relative, rule in producers.items():
        path = workdir / relative
        aside = path.with_name(path.name + ".aside")
        path.rename(aside)  # rename keeps the mtime, so putting it back changes nothing
        try:
            dry = snakemake(workdir, "-n", "all")
        finally:
            aside.rename(path)
        assert dry.returncode == 0, dry.stderr[-4000:]
        outputs = job_outputs(dry.stdout + dry.stderr, rule)
        assert any(relative in line for line in outputs), (relative, outputs)


@pytest.mark.usefixtures("finished")
def test_deleting_one_caption_file_reruns_that_shard_chain_and_the_aggregates(
    workdir: Path,
) -> None:
    (workdir / f"results/{TRAIN}/captions/000001.parquet").unlink()
    untouched = [
        workdir / f"results/{TRAIN}/captions/000000.parquet",
        workdir / f"results/{TRAIN}/attributes/phase2/000000.parquet",
        workdir / f"results/{TRAIN}/h5/phase1/000000.h5",
        workdir / f"results/{EVAL}/attributes/phase2/000000.parquet",
        workdir / f"results/{TRAIN}/shards/000001.tar",
    ]
    before = {p: p.stat().st_mtime_ns for p in untouched}

    dry = snakemake(workdir, "-n", "all")
    assert job_counts(dry.stdout + dry.stderr) == ONE_SHARD_CHAIN

    run = snakemake(workdir, "all")
    assert run.returncode == 0, run.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in untouched} == before
    assert (workdir / f"results/{TRAIN}/captions/000001.parquet").exists()


@contextlib.contextmanager
def edited(path: Path) -> Iterator[None]:
    """Restore ``path`` after the block, so each dry-run test starts from the full run."""
    original = path.read_bytes()
    try:
        yield
    finally:
        path.write_bytes(original)


@pytest.mark.usefixtures("finished")
def test_changing_a_caption_setting_reruns_caption_and_downstream_but_not_ingest(
    workdir: Path,
) -> None:
    with edited(workdir / "config" / "config.yaml"):
        config = load_config(workdir)
        config["caption"]["max_new_tokens"] += 4
        save_config(workdir, config)
        dry = snakemake(workdir, "-n", "all")
    counts = job_counts(dry.stdout + dry.stderr)
    assert "ingest" not in counts and "demo_model" not in counts
    assert counts["caption"] == 3  # both train shards and the eval shard
    assert counts["attributes_phase1"] == counts["attributes_phase2"] == 3
    assert counts["h5"] == 2
    assert counts["train_phase1"] == counts["evaluate"] == 1


@pytest.mark.usefixtures("finished")
def test_changing_a_training_setting_reruns_only_training_and_eval(workdir: Path) -> None:
    with edited(workdir / "config" / "config.yaml"):
        config = load_config(workdir)
        config["train"]["phase2"]["lr"] = 1.0e-4
        save_config(workdir, config)
        dry = snakemake(workdir, "-n", "all")
    assert job_counts(dry.stdout + dry.stderr) == {
        "train_phase2": 1,
        "evaluate": 1,
        "loss_plot": 1,
        "metrics_table": 1,
        "metrics_page": 1,
        "all": 1,
    }


@pytest.mark.usefixtures("finished")
def test_appending_rows_runs_only_the_new_shard_chain(workdir: Path) -> None:
    url_list = workdir / "data" / "train.tsv"
    with edited(url_list):
        rows = url_list.read_text(encoding="utf-8").splitlines(keepends=True)
        # Eight more rows (the same images under new keys) make one new full shard.
        extra = [row.replace("\t", "x\t", 1) for row in rows[1:9]]
        url_list.write_text("".join(rows + extra), encoding="utf-8")
        dry = snakemake(workdir, "-n", "all")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["ingest"] == counts["caption"] == counts["h5"] == 1
    assert counts["attributes_phase1"] == counts["attributes_phase2"] == 1
    assert counts["ingest_summary"] == counts["h5_index"] == 1
    [ingest] = job_outputs(dry.stdout + dry.stderr, "ingest")
    assert ingest.startswith("results/photos/shards/000002.tar")


@pytest.mark.usefixtures("finished")
def test_editing_a_row_reruns_only_its_shard(workdir: Path) -> None:
    url_list = workdir / "data" / "train.tsv"
    with edited(url_list):
        rows = url_list.read_text(encoding="utf-8").splitlines(keepends=True)
        key, url, caption = rows[12].rstrip("\n").split("\t")  # a row of shard 000001
        rows[12] = "\t".join([key, url, caption + " at noon"]) + "\n"
        url_list.write_text("".join(rows), encoding="utf-8")
        dry = snakemake(workdir, "-n", "all")
    [ingest] = job_outputs(dry.stdout + dry.stderr, "ingest")
    assert ingest.startswith("results/photos/shards/000001.tar")


# Each category's items in the report, by the label the report lists them under.
REPORT_ITEMS = {
    "Ingest": {
        "results/{dataset}/ingest_summary.tsv": "shards",
        "results/{dataset}/duplicates.tsv": "duplicates and leaks",
        "results/{dataset}/report/funnel.html": "funnel and failures",
        "results/{dataset}/report/funnel.png": "funnel and failures",
    },
    "Captions": {
        "results/{dataset}/report/gallery.html": "gallery",
        "results/{dataset}/report/caption_lengths.png": "caption length",
    },
    "Attributes": {
        "results/{dataset}/report/top_attributes.png": "top 50 attributes",
        "results/{dataset}/report/attributes_per_image.png": "attributes per image",
        "results/{dataset}/report/parse_failures.html": "parse failures",
        "results/{dataset}/report/dialogs.html": "dialog samples",
    },
    "Training": {"results/train/loss.png": "loss and learning rate"},
    "Eval": {
        "results/eval/metrics.tsv": "R/P/F1@k",
        "results/eval/metrics.html": "R/P/F1@k per dataset and k",
    },
    # {train}: train datasets only.
    "Exports": {
        "results/export/{train}/llava.md": "LLaVA card",
        "results/export/{dataset}/hf/README.md": "Hugging Face dataset card",
    },
}


def item_datasets(pattern: str) -> tuple[str | None, ...]:
    """The datasets a REPORT_ITEMS pattern stands for."""
    if "{dataset}" in pattern:
        return (TRAIN, EVAL)
    return (TRAIN,) if "{train}" in pattern else (None,)


# A resource a page would fetch: <script src=...>, <link href=...>, <img src=...>, url(...).
FETCHED_URL = re.compile(
    r"""(?:\b(?:src|href|srcset)\s*=\s*["']?|url\(\s*["']?|@import\s+["'])https?:""", re.I
)
SCREENSHOT = REPO / "test-artifacts" / "report.png"
# Run inside the report (a copy): list each category's items as the navigation bar shows
# them, and the resources the page loaded; then open the Ingest funnel for the screenshot.
PROBE = """
<script>
(function () {
  const seen = {};
  const names = Object.keys(categories).sort();
  let index = -1;
  function step() {
    if (index < 0) seen.__menu = document.querySelector("nav").innerText;
    else seen[names[index]] = document.querySelector("nav").innerText;
    index += 1;
    if (index < names.length) {
      // Back to the menu first, as a user clicks: the item list is built when it mounts.
      app.setView({ navbarMode: "menu" });
      setTimeout(() => app.showCategory(names[index]), 200);
      setTimeout(step, 400);
      return;
    }
    seen.__resources = performance.getEntriesByType("resource").map((entry) => entry.name);
    const probe = document.createElement("pre");
    probe.id = "vlmflow-probe";
    probe.hidden = true;
    probe.textContent = JSON.stringify(seen);
    document.body.appendChild(probe);
    app.setView({ navbarMode: "menu" });
    setTimeout(() => app.showCategory("Ingest"), 200);
    setTimeout(function () {
      const shown = "results/photos/report/funnel.png";
      app.setView({ content: "img", contentPath: results[shown].data_uri, resultPath: shown });
    }, 400);
  }
  window.addEventListener("load", () => setTimeout(step, 200));
})();
</script>
"""


def report_json(page: str, name: str) -> Any:
    """The ``var NAME = {...};`` data the report's app renders from."""
    match = re.search(rf"<script id=\"{name}\">\s*var {name} = (.*?);\s*</script>", page, re.S)
    assert match, f"no {name} data in the report"
    return json.loads(match[1])


def test_report_shows_every_category_with_its_items_and_needs_no_network(
    workdir: Path, chromium: str, tmp_path: Path
) -> None:
    run = run_readme(workdir, "snakemake --report results/report.html all")
    assert run.returncode == 0, run.stderr[-4000:]
    report = (workdir / "results/report.html").read_text(encoding="utf-8")

    # Every item is in its category, with its caption rendered for its dataset.
    categories, results = report_json(report, "categories"), report_json(report, "results")
    for category, items in REPORT_ITEMS.items():
        listed = {path for paths in categories[category].values() for path in paths}
        for pattern in items:
            for dataset in item_datasets(pattern):
                path = pattern.format(dataset=dataset, train=dataset)
                assert path in listed, f"{path} is not under {category}"
                assert results[path]["caption"].strip(), f"{path} has no caption"
                if dataset:
                    assert dataset in results[path]["caption"], path

    # Nothing is fetched: neither the report nor the pages it embeds name a URL to load.
    pages = [workdir / "results/report.html", workdir / "results/eval/metrics.html"]
    pages += sorted(workdir.glob("results/*/report/*.html"))
    for page in pages:
        found = FETCHED_URL.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page.name} fetches {found[0]!r}"

    # The report as a browser shows it: the menu, and each category's list of items.
    probe_page = tmp_path / "report.html"
    head, body_end, tail = report.rpartition("</body>")  # the script text has others
    probe_page.write_text(head + PROBE + body_end + tail, encoding="utf-8")
    budget = "--virtual-time-budget=15000"
    dom = run_chromium(chromium, probe_page, tmp_path / "profile-dom", budget, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-4000:]
    match = re.search(r'<pre id="vlmflow-probe" hidden="">(.*?)</pre>', dom.stdout, re.S)
    assert match, "the report's app did not render (no probe output)"
    seen = json.loads(htmllib.unescape(match[1]))
    for category in REPORT_ITEMS:
        assert category in seen["__menu"].splitlines(), category
    for category, items in REPORT_ITEMS.items():
        rows: Counter[str] = Counter()  # label -> rows listing it (one per dataset)
        for pattern, label in items.items():
            rows[label] += len(item_datasets(pattern))
        for label, count in rows.items():
            listed = seen[category].count(label)
            assert listed >= count, f"{category} lists {label!r} {listed} times, not {count}"
        if category not in ("Training", "Eval"):
            assert TRAIN in seen[category] and EVAL in seen[category], category
    assert not [url for url in seen["__resources"] if url.startswith(("http:", "https:"))]

    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = run_chromium(
        chromium,
        probe_page,
        tmp_path / "profile-shot",
        budget,
        f"--screenshot={SCREENSHOT}",
        "--window-size=1400,900",
    )
    assert shot.returncode == 0, shot.stderr[-4000:]
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")


def switch_to_json(config: dict[str, Any], phase: str) -> None:
    """A phase in json mode as a user switches it: the json prompt, and bounds whose
    longest list max_new_tokens holds (no planning warning)."""
    section = config["attributes"][phase]
    section["prompt"] = f"config/prompts/attributes_{phase}_json.txt"
    section |= {"format": "json", "max_items": 4, "max_item_chars": 6}
    # Room for the longest list even in multi-byte characters (a token per byte): the
    # demo LLM's noise has them.
    section["max_new_tokens"] = 120


@pytest.mark.usefixtures("finished")
@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_switching_one_phase_to_json_reruns_that_phase_and_what_depends_on_it(
    workdir: Path, phase: str
) -> None:
    with edited(workdir / "config" / "config.yaml"):
        config = load_config(workdir)
        switch_to_json(config, phase)
        save_config(workdir, config)
        dry = snakemake(workdir, "-n", "all")
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-4000:]
    assert "can cut a JSON list" not in output
    counts = job_counts(output)
    assert "caption" not in counts and "ingest" not in counts
    assert counts.get("attributes_phase1", 0) == (3 if phase == "phase1" else 0)
    assert counts["attributes_phase2"] == 3  # both train shards and the eval shard
    assert counts["h5"] == 2 and counts["train_phase1"] == counts["evaluate"] == 1


def test_json_mode_runs_end_to_end_and_a_rerun_has_nothing_to_do(workdir: Path) -> None:
    config = load_config(workdir)
    for phase in ("phase1", "phase2"):
        switch_to_json(config, phase)
    save_config(workdir, config)
    run = snakemake(workdir, "all")
    assert run.returncode == 0, run.stderr[-4000:]
    for dataset, shards in ((TRAIN, TRAIN_SHARDS), (EVAL, ["000000"])):
        for shard in shards:
            for phase in ("phase1", "phase2"):
                path = workdir / f"results/{dataset}/attributes/{phase}/{shard}.parquet"
                rows = pq.read_table(path).to_pylist()
                answers = [row["raw_answer"] for row in rows if row["raw_answer"] is not None]
                assert answers and all(isinstance(json.loads(a), list) for a in answers)
                assert {json.loads(row["settings"])["format"] for row in rows} == {"json"}
    assert (workdir / "results/eval/metrics.tsv").is_file()
    again = snakemake(workdir, "-n", "all")
    assert job_counts(again.stdout + again.stderr) == {}


@pytest.mark.usefixtures("finished")
def test_slurm_profile_dry_run_needs_no_cluster_and_asks_gpus_for_model_rules(
    workdir: Path,
) -> None:
    (workdir / "results/eval/metrics.tsv").unlink()
    (workdir / f"results/{TRAIN}/captions/000000.parquet").unlink()
    dry = snakemake(workdir, "-n", "all", profile="profiles/slurm")
    assert dry.returncode == 0, dry.stderr[-4000:]
    output = dry.stdout + dry.stderr
    jobs = output.split("\nrule ")[1:]
    caption = next(job for job in jobs if job.startswith("caption:"))
    assert "gpu=1" in caption and "slurm_partition=gpu" in caption
    h5 = next(job for job in jobs if job.startswith("h5:"))
    assert "gpu=" not in h5 and "slurm_partition=cpu" in h5


# Snakemake's command line in a process where one stage's code version is one higher, as
# after a commit that bumps it in vlmflow.core.stage_versions.
BUMPED = """
import sys
from vlmflow.core import stage_versions
stage_versions.STAGE_VERSIONS[sys.argv.pop(1)] += 1
from snakemake.cli import main
sys.argv[0] = "snakemake"
main()
"""


@pytest.mark.usefixtures("finished")
@pytest.mark.parametrize("stage", ["caption", "h5"])
def test_a_stage_version_bump_reruns_that_stage_and_what_depends_on_it(
    workdir: Path, stage: str
) -> None:
    dry = snakemake(workdir, "-n", "all", launcher=[sys.executable, "-c", BUMPED, stage])
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-4000:]
    counts = job_counts(output)
    assert "ingest" not in counts and "demo_model" not in counts
    if stage == "caption":  # every shard's captions, then all that reads them
        assert counts["caption"] == counts["attributes_phase1"] == 3
    else:  # the train datasets' H5 files and training; nothing before them
        assert "caption" not in counts and "attributes_phase2" not in counts
    assert counts["h5"] == 2 and counts["train_phase1"] == counts["evaluate"] == 1
    assert "params changed" in output or "Params have changed" in output
