"""`vlmflow status` on a half-finished run: some shards done, one job failed, one stale."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.workflow.conftest import (
    SNAKEMAKE,
    load_config,
    make_workdir,
    run_readme,
    save_config,
    snakemake,
)

pytestmark = pytest.mark.workflow


def vlmflow_status(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The README's `vlmflow status`, with ``args`` after it."""
    return run_readme(workdir, "vlmflow status", *args, timeout=300)


def stage(report: dict[str, Any], dataset: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in report["stages"] if s["dataset"] == dataset and s["stage"] == name]
    return found


def test_status_of_a_half_finished_run(tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path)
    # Shard 000000 through attributes phase 2, shard 000001 ingested only.
    done = snakemake(
        workdir,
        "results/photos/attributes/phase2/000000.parquet",
        "results/photos/shards/000001.tar",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Shard 000001's tar is damaged after the fact: its caption job fails.
    tar = workdir / "results/photos/shards/000001.tar"
    stamp = tar.stat()
    tar.write_bytes(tar.read_bytes()[:3000])
    os.utime(tar, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    failed = snakemake(workdir, "results/photos/captions/000001.parquet")
    assert failed.returncode != 0

    result = vlmflow_status(workdir, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ingest = stage(report, "photos", "ingest")
    assert (ingest["shards_done"], ingest["shards_total"], ingest["samples_ok"]) == (2, 2, 16)
    caption = stage(report, "photos", "caption")
    assert (caption["shards_done"], caption["shards_total"], caption["samples_ok"]) == (1, 2, 8)
    phase1 = stage(report, "photos", "attributes phase 1")
    assert (phase1["shards_done"], phase1["samples_ok"], phase1["samples_failed"]) == (1, 8, 0)
    # Phase 2 keeps a sample whose phase-2 answer failed (phase-1 attributes only): counted
    # as kept, and apart, by reason, as the table's phase2_failure column says.
    phase2 = stage(report, "photos", "attributes phase 2")
    table = pq.read_table(workdir / "results/photos/attributes/phase2/000000.parquet")
    phase2_failures = [f for f in table.column("phase2_failure").to_pylist() if f]
    assert (phase2["shards_done"], phase2["samples_ok"], phase2["samples_failed"]) == (1, 8, 0)
    assert sum(phase2["phase1_only"].values()) == len(phase2_failures)
    assert stage(report, "photos", "h5 phase 1")["shards_done"] == 0
    assert stage(report, "photos", "h5 phase 2")["shards_done"] == 0
    assert stage(report, "photos_eval", "ingest")["shards_done"] == 0
    assert {s["rule"]: s["state"] for s in report["singles"]}["train_phase1"] == "missing"
    assert report["stale"] == {}
    (job,) = report["failed"]
    assert job["rule"] == "caption"
    assert job["outputs"] == ["results/photos/captions/000001.parquet"]
    assert job["log"] == "logs/caption/photos/000001.log"
    assert job["last_error"].endswith(
        "results/photos/shards/000001.tar: damaged WebDataset shard (unexpected end of data); "
        "delete it and rerun its ingest job"
    )

    # An edited setting: Snakemake's own reason shows up for exactly that rule's outputs.
    config = load_config(workdir)
    phase1_settings = config.setdefault("attributes", {}).setdefault("phase1", {})
    phase1_settings["max_new_tokens"] = int(phase1_settings.get("max_new_tokens", 64)) + 3
    save_config(workdir, config)
    text = vlmflow_status(workdir)
    assert text.returncode == 0, text.stderr
    assert (
        "attributes_phase1: 1 params changed (results/photos/attributes/phase1/000000.parquet)"
        in text.stdout
    )
    # Downstream, --summary itself says "ok" (plan: update pending); its recorded input
    # is what will change.
    assert (
        "attributes_phase2: 1 input files updated by another job "
        "(results/photos/attributes/phase2/000000.parquet)" in text.stdout
    )
    assert "caption:" not in text.stdout.split("Stale", 1)[1].split("Failed jobs", 1)[0]
    assert "caption -> results/photos/captions/000001.parquet" in text.stdout
    # The table: 0 of 2 shards done, 1 stale, its 8 samples.
    assert re.search(r"^photos +attributes phase 1 +0/2 +1 +8 +0", text.stdout, re.MULTILINE)

    # Snakemake killed while an ingest job wrote its stats (an incomplete marker left
    # behind, as Snakemake's file persistence names it): --summary calls the file "ok",
    # vlmflow status does not, and Snakemake's own dry run agrees that it is incomplete.
    output = "results/photos/shards/000000.stats.json"
    marker = workdir / ".snakemake/incomplete" / base64.urlsafe_b64encode(output.encode()).decode()
    marker.write_text('{"external_jobid": null}', encoding="utf-8")
    dry_run = subprocess.run(
        [SNAKEMAKE, "-n", output], cwd=workdir, capture_output=True, text=True, check=False
    )
    assert f"Incomplete files:\n{output}" in dry_run.stdout + dry_run.stderr
    report = json.loads(vlmflow_status(workdir, "--json").stdout)
    assert report["stale"]["ingest"] == {"incomplete (its job is running, or was killed)": [output]}
    ingest = stage(report, "photos", "ingest")
    assert (ingest["shards_done"], ingest["shards_stale"], ingest["samples_ok"]) == (1, 1, 8)
