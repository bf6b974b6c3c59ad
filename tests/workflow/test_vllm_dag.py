"""The whole DAG with captions and both attribute phases (in json mode) on the vLLM backend."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.workflow.conftest import REPO, job_counts, load_config, make_workdir, save_config
from tests.workflow.conftest import snakemake as run_snakemake
from vlmflow.miniatures import install

pytestmark = [pytest.mark.workflow, pytest.mark.vllm]

PIN = "7a" * 20
VLM = f"llava-hf/llava-1.5-7b-hf@{PIN}"
LLM = f"meta-llama/Meta-Llama-3-8B-Instruct@{PIN}"
PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    cache = tmp_path_factory.mktemp("hub")
    for reference in (VLM, LLM):
        install(reference, cache)
    workdir = make_workdir(tmp_path_factory.mktemp("vllm"))
    config = load_config(workdir)
    for dataset in config["datasets"].values():
        dataset["shard_size"] = 16  # one shard each: every server start costs ~30 s here
    config["models"] |= {"vlm": VLM, "llm": LLM}
    engine = {"max_model_len": 2048}
    for section in (
        config["caption"],
        config["attributes"]["phase1"],
        config["attributes"]["phase2"],
    ):
        section |= {"backend": "vllm", "engine": engine, "dtype": "float32"}
    # Both attribute phases in json mode: vLLM's structured outputs (the text mode's rows
    # equal the HF backend's in tests/test_vllm.py).
    for phase in ("phase1", "phase2"):
        section = config["attributes"][phase]
        section |= {
            "prompt": f"config/prompts/attributes_{phase}_json.txt",
            "format": "json",
            "max_items": 4,
            "max_item_chars": 6,
            "max_new_tokens": 42,
        }
    config["vllm"] = {"command": f"{PYTHON} -m vllm.entrypoints.openai.api_server"}
    save_config(workdir, config)
    env = {"HF_HUB_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1"}
    # One job at a time: two CPU engines on two cores would fight over them.
    run = run_snakemake(workdir, "all", "--cores", "1", env=env, timeout=2400)
    return workdir, env, run.stdout + run.stderr if run.returncode else ""


def test_every_generation_stage_on_vllm_runs_end_to_end_and_a_rerun_does_nothing(
    vllm_run: tuple[Path, dict[str, str], str],
) -> None:
    workdir, env, failure = vllm_run
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
    assert (workdir / "logs" / "caption" / "photos" / "000000.vllm.log").is_file()
    assert (results / "eval" / "metrics.tsv").is_file()
    again = run_snakemake(workdir, "-n", "all", env=env)
    assert again.returncode == 0 and job_counts(again.stdout) == {}, again.stdout[-3000:]
