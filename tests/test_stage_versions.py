"""Each data stage's outputs on fixed inputs, against the digest recorded for its version
(vlmflow.core.stage_versions). A change to what a stage writes must bump the stage's version,
which reruns exactly its jobs and what follows; this test fails when the outputs change
and the version does not, so a forgotten bump cannot land.

Each stage runs by its own function, as its job runs it, on inputs of its own that no
other stage's code makes (so a change shows up as its stage's alone): six drawn images
in a folder to ingest; a shard of them for the demo VLM to caption; fixed captions and
phase-1 attributes for the demo LLM (sampling as the demo does, seeded); the shard and
fixed attributes to pack into H5 files. After a deliberate
change (and its bump), record the new digests with

    .venv/bin/python -m tests.test_stage_versions --record
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest
from PIL import Image, ImageDraw

from vlmflow.core.io import read_parquet_rows, write_rows_parquet
from vlmflow.core.prompts import read_prompt
from vlmflow.core.shards import iter_samples
from vlmflow.core.stage_versions import STAGE_VERSIONS
from vlmflow.stages import attributes, caption, h5
from vlmflow.stages.caption import CAPTION_SCHEMA
from vlmflow.stages.ingest import IngestSettings, ingest_source_shard
from vlmflow.stages.ingest.collections import ImageFolderSource

REPO = Path(__file__).resolve().parents[1]
RECORDED = Path(__file__).with_name("stage_digests.json")
PROMPTS = REPO / "config" / "prompts"
# The stages whose outputs are data (training and evaluation are versioned too, but their
# outputs are weights and scores, digested by nothing here).
DATA_STAGES = ("ingest", "caption", "attributes_phase1", "attributes_phase2", "h5")


def draw_folder(root: Path) -> Path:
    """Six images of different sizes and shapes, three with a caption file beside them."""
    root.mkdir(parents=True)
    for n in range(6):
        size = (48 + 20 * n, 40 + 12 * (n % 3))
        image = Image.new("RGB", size, (30 * n, 200 - 25 * n, 90))
        ImageDraw.Draw(image).ellipse((4, 4, size[0] // 2, size[1] - 4), fill=(240, 240, 20))
        image.save(root / f"img{n}.{'png' if n % 2 else 'jpg'}")
        if n % 2 == 0:
            (root / f"img{n}.txt").write_text(f"a yellow ellipse on colour {n}", encoding="utf-8")
    return root


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# Columns that say where the run happened, not what the stage made of its inputs: the
# library versions (engine) and the model's folder (model, and in the settings JSON).
WHERE = ("engine", "model", "settings")


def rows_digest(path: Path, leave_out: tuple[str, ...] = WHERE) -> str:
    """The rows' values but the ``leave_out`` columns."""
    rows = read_parquet_rows(path)
    return digest([{k: v for k, v in row.items() if k not in leave_out} for row in rows])


KEYS = [f"img{n}" for n in range(6)]
CAPTIONS = [
    "A yellow ellipse on a red field, with a green border.",
    "This is a photo of a dog on the grass next to a tree.",
    "Two cars parked on a street at night, lights on.",
    "A bowl of fruit on a wooden table near a window.",
    "",
    "A blue sky with white clouds above a mountain lake.",
]
PHASE1 = [["yellow ellipse", "red field"], ["dog", "grass", "tree"], [], ["bowl", "fruit"]]


def fixed_tar(folder: Path, path: Path) -> Path:
    """The drawn images as an ingested shard would hold them (the ingest stage's own
    output is digested apart, so a change there does not show up as the next stage's)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as writer:
        for n, image in enumerate(sorted(folder.glob("img*.*[gp]"))):
            with Image.open(image) as drawn:
                buffer = io.BytesIO()
                drawn.convert("RGB").save(buffer, format="JPEG", quality=90)
                size = drawn.size
            meta = {"key": KEYS[n], "width": size[0], "height": size[1]}
            writer.write(
                {
                    "__key__": KEYS[n],
                    "jpg": buffer.getvalue(),
                    "txt": f"web {n}",
                    "json": json.dumps(meta),
                }
            )
    return path


def fixed_rows(path: Path, schema: Any, rows: list[dict[str, Any]]) -> Path:
    common = {"model": "m", "engine": None, "prompt_id": "p", "settings": "{}"}
    full = [{name: None for name in schema.names} | common | row for row in rows]
    write_rows_parquet(path, full, schema)
    return path


def captions_input(path: Path) -> Path:
    rows = [
        {"key": key, "web_caption": f"web {n}", "vlm_caption": text, "failure": None}
        for n, (key, text) in enumerate(zip(KEYS, CAPTIONS, strict=True))
    ]
    rows[4]["failure"] = "caption_error: the engine answered nothing"
    return fixed_rows(path, CAPTION_SCHEMA, rows)


def phase1_input(path: Path) -> Path:
    rows = []
    for n, key in enumerate(KEYS):
        labels = PHASE1[n] if n < len(PHASE1) else ["sky", "cloud", "lake"]
        failure = None if labels else "no_attributes"
        rows.append(
            {
                "key": key,
                "web_caption": f"web {n}",
                "vlm_caption": CAPTIONS[n],
                "raw_answer": ", ".join(labels),
                "attributes": labels,
                "failure": failure,
            }
        )
    return fixed_rows(path, attributes.PHASE1_SCHEMA, rows)


def phase2_input(path: Path) -> Path:
    rows = []
    for n, key in enumerate(KEYS):
        labels = PHASE1[n] if n < len(PHASE1) else ["sky", "cloud", "lake"]
        extra = ["ellipse"] if n == 0 else []
        rows.append(
            {
                "key": key,
                "raw_answer": ", ".join(extra),
                "phase1_attributes": labels,
                "phase2_attributes": extra,
                "attributes": labels + extra,
                "attribute_sources": ["phase1"] * len(labels) + ["phase2"] * len(extra),
                "failure": None if labels else "no_attributes",
            }
        )
    return fixed_rows(path, attributes.PHASE2_SCHEMA, rows)


def run_stages(work: Path, models: dict[str, str]) -> dict[str, str]:
    """Every data stage on its own fixed inputs: {stage: digest of its outputs}."""
    folder = draw_folder(work / "images")
    tar, stats = work / "ingested.tar", work / "ingested.stats.json"
    source = ImageFolderSource(folder)
    ingest_source_shard(source, 0, source.count(), IngestSettings(), tar, stats, "000000")
    members = [
        [s.key, hashlib.sha256(s.image_data).hexdigest(), s.image_ext, s.web_caption, meta]
        for s in iter_samples(tar)
        # The url is the image's absolute file:// path in this run's folder.
        for meta in [{k: v for k, v in s.meta.items() if k != "url"}]
    ]
    failures = json.loads(stats.read_text(encoding="utf-8"))["failures"]
    digests = {"ingest": digest([members, failures])}

    shard = fixed_tar(folder, work / "000000.tar")
    captions = work / "captions.parquet"
    caption_settings = caption.CaptionSettings(
        model=models["vlm"], prompt=read_prompt(PROMPTS / "caption.txt"), max_new_tokens=24
    )
    caption.run(shard, captions, caption_settings, "000000")
    digests["caption"] = rows_digest(captions)

    for phase, run, given in (
        ("phase1", attributes.run_phase1, captions_input(work / "in-captions.parquet")),
        ("phase2", attributes.run_phase2, phase1_input(work / "in-phase1.parquet")),
    ):
        settings = attributes.LLMSettings(
            model=models["llm"],
            prompt=read_prompt(PROMPTS / f"attributes_{phase}.txt"),
            max_new_tokens=48,
        )
        out = work / f"{phase}.parquet"
        run(given, out, settings, "000000")
        digests[f"attributes_{phase}"] = rows_digest(out)

    packed = {name: work / "h5" / f"{name}.h5" for name in ("phase1", "phase2")}
    h5.run_shard(
        shard,
        phase1_input(work / "h5-phase1.parquet"),
        phase2_input(work / "h5-phase2.parquet"),
        models["lm"],
        models["vision"],
        h5.H5Settings(max_seq_len=160),
        "000000",
        packed["phase1"],
        packed["phase2"],
        work / "h5" / "images",
        work / "h5" / "params.json",
    )
    arrays = []
    for path in packed.values():
        with h5py.File(path, "r") as handle:
            arrays.append(
                {name: hashlib.sha256(handle[name][:].tobytes()).hexdigest() for name in handle}
            )
    digests["h5"] = digest(arrays)
    return digests


def recorded() -> dict[str, dict[str, Any]]:
    return json.loads(RECORDED.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def digests(
    demo_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return run_stages(tmp_path_factory.mktemp("stages"), demo_models)


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_stage_whose_outputs_changed_has_a_new_version(
    stage: str, digests: dict[str, str]
) -> None:
    known = recorded()[stage]
    version = STAGE_VERSIONS[stage]
    record = "record its digest: .venv/bin/python -m tests.test_stage_versions --record"
    assert known["version"] == version, (
        f"{stage} is at version {version}, its digest was recorded at {known['version']}: " + record
    )
    assert digests[stage] == known["digest"], (
        f"what the {stage} stage writes changed, and its version did not: bump "
        f"STAGE_VERSIONS[{stage!r}] in src/vlmflow/core/stage_versions.py (outputs made by the "
        f"old code then rerun), then {record}"
    )


def record(build_models: Callable[[Path], dict[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        digests = run_stages(Path(folder) / "work", build_models(Path(folder)))
    table = {
        stage: {"version": STAGE_VERSIONS[stage], "digest": digests[stage]} for stage in DATA_STAGES
    }
    RECORDED.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"recorded {RECORDED}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.test_stage_versions --record")
    from tests.conftest import build_demo_models

    record(build_demo_models)
