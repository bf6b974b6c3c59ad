"""The attribute rules on a Meta-format checkpoint split over two model-parallel shards:
Snakemake runs the rule, the rule starts two torchrun processes (gloo on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.workflow.conftest import job_counts, load_config, make_workdir, save_config, snakemake

pytestmark = pytest.mark.workflow

SHARD = "results/photos_eval/attributes/phase2/000000.parquet"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workdir(tmp_path_factory.mktemp("meta"))
    config = load_config(root)
    config["models"]["llm"] = "results/models/demo-metallama"
    config.setdefault("demo_models", {})["model_parallel"] = 2
    save_config(root, config)
    return root


def test_attribute_phases_run_on_two_model_parallel_processes(workdir: Path) -> None:
    dry = snakemake(workdir, "-n", SHARD)
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["attributes_phase1"] == counts["attributes_phase2"] == 1
    assert counts["demo_model"] == 2  # the VLM and the Meta-format LLM

    run = snakemake(workdir, SHARD)
    assert run.returncode == 0, run.stderr[-4000:]
    model = workdir / "results/models/demo-metallama"
    assert sorted(p.name for p in model.iterdir() if not p.name.startswith(".")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
    ]
    for phase in ("phase1", "phase2"):
        log = (workdir / f"logs/attributes_{phase}/photos_eval/000000.log").read_text()
        assert "torch.distributed.run --standalone --nproc-per-node=2" in log
        assert "rank 0/2" in log and "rank 1/2" in log
    captions = pq.read_table(workdir / "results/photos_eval/captions/000000.parquet")
    keys = captions.column("key").to_pylist()
    for phase in ("phase1", "phase2"):
        rows = pq.read_table(workdir / f"results/photos_eval/attributes/{phase}/000000.parquet")
        assert rows.column("key").to_pylist() == keys
        assert set(rows.column("model").to_pylist()) == {"results/models/demo-metallama"}
    # Nothing left behind: no job spec, no progress file.
    leftovers = [p.name for p in (workdir / "results/photos_eval/attributes").rglob(".*")]
    leftovers += [p.name for p in (workdir / "results").rglob("*.progress.jsonl")]
    assert leftovers == []
    assert "Nothing to be done" in snakemake(workdir, "-n", SHARD).stdout
