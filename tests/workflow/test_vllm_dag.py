"""The demo DAG with every generating stage on the vLLM backend, as the README runs it:
``snakemake --profile profiles/local all --configfile config/vllm.yaml``, with no engine
variable in the environment; then vLLM serves the model the DAG trained."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.workflow.conftest import (
    REPO,
    job_counts,
    load_config,
    make_workdir,
    run_readme,
    save_config,
)
from tests.workflow.conftest import snakemake as run_snakemake
from vlmflow.core import engine
from vlmflow.stages import caption
from vlmflow.stages.caption import CaptionSettings

pytestmark = [pytest.mark.workflow, pytest.mark.vllm]

README = "snakemake --profile profiles/local all --configfile config/vllm.yaml"
OVERLAY = ("--configfile", "config/vllm.yaml")
# Nothing the user would not have: the engine sizes itself from the job's resources.
NO_ENGINE_VARIABLES = {"VLLM_CPU_KVCACHE_SPACE": None}


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = make_workdir(tmp_path_factory.mktemp("vllm"))
    # The engine's environment where `make setup-vllm` puts it in a clone.
    (workdir / ".venv-vllm").symlink_to(REPO / ".venv-vllm")
    config = load_config(workdir)
    for dataset in config["datasets"].values():
        dataset["shard_size"] = 16  # one shard each: every server start costs ~30 s here
    # Both attribute phases in json mode: vLLM's structured outputs (the text mode's rows
    # equal the HF backend's in tests/test_vllm.py).
    for phase in ("phase1", "phase2"):
        config["attributes"][phase] |= {
            "prompt": f"config/prompts/attributes_{phase}_json.txt",
            "format": "json",
            "max_items": 4,
            "max_item_chars": 6,
            "max_new_tokens": 120,
        }
    save_config(workdir, config)
    run = run_readme(workdir, README, env=NO_ENGINE_VARIABLES, timeout=2400)
    return workdir, run.stdout + run.stderr if run.returncode else ""


def test_the_demo_on_vllm_runs_end_to_end_and_a_rerun_does_nothing(
    vllm_run: tuple[Path, str],
) -> None:
    workdir, failure = vllm_run
    assert not failure, failure[-6000:]
    results = workdir / "results"
    for stage in ("captions", "attributes/phase1", "attributes/phase2"):
        rows = pq.read_table(results / "photos" / stage / "000000.parquet").to_pylist()
        assert len(rows) == 16
        engines = {row["engine"] for row in rows if row["engine"] is not None}
        assert engines and all(name.startswith("vllm ") for name in engines), (stage, engines)
        assert all(json.loads(row["settings"])["backend"] == "vllm" for row in rows)
        if stage != "captions":
            answers = [row["raw_answer"] for row in rows if row["raw_answer"] is not None]
            assert answers and all(isinstance(json.loads(a), list) for a in answers), stage
    log = (workdir / "logs" / "caption" / "photos" / "000000.log").read_text(encoding="utf-8")
    assert "CPU KV cache: 1 GiB" in log  # from the job's mem_mb, not 90 % of the machine
    assert (results / "eval" / "metrics.tsv").is_file()
    again = run_snakemake(workdir, "-n", "all", *OVERLAY, env=NO_ENGINE_VARIABLES)
    assert again.returncode == 0 and job_counts(again.stdout) == {}, again.stdout[-3000:]


def test_vllm_serves_the_model_the_dag_trained(vllm_run: tuple[Path, str], tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    workdir, failure = vllm_run
    assert not failure, failure[-6000:]
    trained = workdir / "results" / "train" / "phase2"
    AutoModelForImageTextToText.from_pretrained(trained)
    AutoProcessor.from_pretrained(trained)
    settings = CaptionSettings(
        model=str(trained),
        prompt="List the objects and attributes in the image.",
        max_new_tokens=8,
        do_sample=False,
        backend="vllm",
    )
    python = REPO / ".venv-vllm" / "bin" / "python"
    place = engine.Deployment(str(python), str(tmp_path / "vllm.log"), 2000)
    out = tmp_path / "captions.parquet"
    shard = workdir / "results" / "photos_eval" / "shards" / "000000.tar"
    counts = caption.run(shard, out, settings, "000000", place)
    assert counts["failed"] == 0 and counts["ok"] == 8
    rows = pq.read_table(out).to_pylist()
    assert all(row["engine"].startswith("vllm ") for row in rows)
