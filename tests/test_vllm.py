"""The vLLM backend (vlmflow.core.engine) against the HF backend, on tiny models vLLM can run.

Needs the engine's environment (`make setup-vllm`, or VLMFLOW_VLLM_PYTHON pointing at a
Python with vLLM); run with `make test-vllm` (`pytest -m vllm`). vLLM's CPU attention
needs a head dimension of at least 32, which the miniatures have (vlmflow.demo.miniatures).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import make_image
from vlmflow.core import engine
from vlmflow.core.io import write_rows_parquet
from vlmflow.core.progress import progress_path
from vlmflow.core.prompts import read_prompt
from vlmflow.demo import miniatures
from vlmflow.families import internvl_chat
from vlmflow.stages import attributes, caption
from vlmflow.stages.caption import CAPTION_SCHEMA, CaptionSettings

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("VLMFLOW_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
PIN = "5e" * 20
LLAVA = f"llava-hf/llava-1.5-7b-hf@{PIN}"
QWEN = f"Qwen/Qwen2-VL-7B-Instruct@{PIN}"
INTERNVL = f"OpenGVLab/InternVL3-8B-hf@{PIN}"
V15 = f"{internvl_chat.V15_REPO}@{PIN}"
PHASE1 = read_prompt(REPO / "config" / "prompts" / "attributes_phase1.txt")
PHASE2 = read_prompt(REPO / "config" / "prompts" / "attributes_phase2.txt")
PHASE1_JSON = read_prompt(REPO / "config" / "prompts" / "attributes_phase1_json.txt")
PHASE2_JSON = read_prompt(REPO / "config" / "prompts" / "attributes_phase2_json.txt")
# InternVL's 12 tiles + thumbnail are 3,328 image tokens.
ENGINE = {"max_model_len": 4096}


@pytest.fixture(scope="module", autouse=True)
def engine_environment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A hub cache with the miniatures, and the CPU engine's settings, for every test."""
    if not Path(PYTHON).exists():
        pytest.fail(f"{PYTHON} is missing: build the engine's environment with make setup-vllm")
    cache = tmp_path_factory.mktemp("hub")
    for reference in (LLAVA, QWEN, INTERNVL, V15):
        miniatures.install(reference, cache)
    saved = {name: os.environ.get(name) for name in ("HF_HUB_CACHE", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["HF_HUB_CACHE"] = str(cache)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for tiny models
    import huggingface_hub.constants

    original = huggingface_hub.constants.HF_HUB_CACHE
    huggingface_hub.constants.HF_HUB_CACHE = str(cache)
    yield cache
    huggingface_hub.constants.HF_HUB_CACHE = original
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Llama-3-8B-Instruct in miniature without the list bias: its greedy answers are
    varied text rather than runs of commas, which makes equal answers mean something."""
    folder = tmp_path_factory.mktemp("llm") / "llama3"
    miniatures.build_llama3_instruct(folder, seed=1, list_bias=0.0)
    return str(folder)


def deployment(tmp_path: Path) -> engine.Deployment:
    return engine.Deployment(command=PYTHON, log_path=str(tmp_path / "vllm.log"))


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """Six images of three shapes, so a batch mixes sizes."""
    return write_shard(tmp_path / "000000.tar", 6)


def write_shard(path: Path, count: int) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for n in range(count):
            width, height = (64 + 24 * (n % 3), 48 + 16 * (n % 2))
            writer.write(
                {
                    "__key__": f"k{n:03d}",
                    "jpg": make_image(width, height, (97 * n % 256, (57 * n + 80) % 256, 150)),
                    "txt": f"a coloured box number {n}",
                    "json": json.dumps({"key": f"k{n:03d}", "width": width, "height": height}),
                }
            )
    return path


def captions(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("model", [LLAVA, QWEN, INTERNVL], ids=["llava", "qwen2vl", "internvl"])
def test_vllm_captions_equal_the_hf_backends_greedy_captions(
    model: str, shard: Path, tmp_path: Path
) -> None:
    settings = CaptionSettings(
        model=model,
        prompt="Describe the image.",
        max_new_tokens=12,
        do_sample=False,
        batch_size=4,
        dtype="float32",
    )
    caption.run(shard, tmp_path / "hf.parquet", settings, "000000")
    vllm = replace(settings, backend="vllm", engine=ENGINE)
    caption.run(shard, tmp_path / "vllm.parquet", vllm, "000000", deployment(tmp_path))
    hf_rows, vllm_rows = captions(tmp_path / "hf.parquet"), captions(tmp_path / "vllm.parquet")
    assert [r["vlm_caption"] for r in vllm_rows] == [r["vlm_caption"] for r in hf_rows]
    # Text, not only early stops (a random tiny VLM may end some captions at once).
    assert any(len(r["vlm_caption"]) >= 5 for r in hf_rows)
    assert {r["engine"].split()[0] for r in vllm_rows} == {"vllm"}
    assert {r["engine"].split()[0] for r in hf_rows} == {"transformers"}
    assert all(json.loads(r["settings"])["backend"] == "vllm" for r in vllm_rows)


def write_captions(path: Path) -> Path:
    texts = [
        ("a red car", "A red car parked on a city street next to a tall building."),
        ("dog", "A dog on the grass in a green field with trees."),
        ("UNREADABLE", ""),
        ("sea", "A boat on the sea and a beach with sand and shells."),
        ("cat", "A cat sleeping on a sofa near a window."),
    ]
    rows = [
        {
            "key": f"k{i:03d}",
            "web_caption": web,
            "vlm_caption": vlm,
            "failure": None if vlm else "caption_error: x",
            "model": "vlm",
            "engine": None,
            "prompt_id": "p",
            "settings": "{}",
        }
        for i, (web, vlm) in enumerate(texts)
    ]
    write_rows_parquet(path, rows, CAPTION_SCHEMA)
    return path


def write_phase1(path: Path) -> Path:
    lists = [["red car", "car", "street"], [], ["dog", "green grass"], ["cat", "sofa"], ["boat"]]
    rows = [
        {
            "key": f"k{i:03d}",
            "web_caption": "w",
            "vlm_caption": "v",
            "raw_answer": "raw",
            "attributes": items,
            "model": "llm",
            "prompt_id": "p",
            "failure": None if items else "no_items",
        }
        for i, items in enumerate(lists)
    ]
    write_rows_parquet(path, rows, attributes.PHASE1_SCHEMA)
    return path


@pytest.mark.parametrize("answer_format", ["text", "json"])
def test_both_attribute_phases_through_vllm_equal_the_hf_backend(
    llm: str, tmp_path: Path, answer_format: str
) -> None:
    json_mode = answer_format == "json"
    phase1_prompt, phase2_prompt = (PHASE1_JSON, PHASE2_JSON) if json_mode else (PHASE1, PHASE2)
    captions_path = write_captions(tmp_path / "captions.parquet")
    results = {}
    for backend in ("hf", "vllm"):
        settings = attributes.LLMSettings(
            model=llm,
            prompt=phase1_prompt,
            # json: room for the longest list the bounds allow (3 items of 8 characters).
            max_new_tokens=40 if json_mode else 16,
            do_sample=False,
            batch_size=2,
            dtype="float32",
            backend=backend,
            engine=ENGINE if backend == "vllm" else {},
            format=answer_format,
            max_items=3,
            max_item_chars=8,
        )
        phase1 = tmp_path / f"phase1-{backend}.parquet"
        phase2 = tmp_path / f"phase2-{backend}.parquet"
        place = deployment(tmp_path)
        attributes.run_phase1(captions_path, phase1, settings, "000000", place)
        # Phase 2 reads the same phase-1 rows with either backend, lists a real model gives.
        source = write_phase1(tmp_path / "phase1.parquet")
        phase2_settings = replace(settings, prompt=phase2_prompt)
        attributes.run_phase2(source, phase2, phase2_settings, "000000", place)
        results[backend] = (captions(phase1), captions(phase2))
    for hf, vllm in zip(results["hf"], results["vllm"], strict=True):
        assert [r["raw_answer"] for r in vllm] == [r["raw_answer"] for r in hf]
        assert [r["failure"] for r in vllm] == [r["failure"] for r in hf]
    answers = [r["raw_answer"] for r in results["hf"][0] if r["failure"] != "caption_failed"]
    assert len(answers) == 4 and all(len(a) > 5 for a in answers)  # text, not an early stop
    phase2_answers = [r["raw_answer"] for r in results["hf"][1] if r["raw_answer"] is not None]
    assert len(phase2_answers) == 4 and len(set(phase2_answers)) > 1
    if json_mode:
        assert all(isinstance(json.loads(a), list) for a in answers + phase2_answers)
    assert results["vllm"][0][2]["failure"] == "caption_failed"  # counted, never sent
    assert results["vllm"][0][0]["engine"].startswith("vllm ")


def test_sampled_vllm_answers_depend_on_the_seed_and_key_only(llm: str, tmp_path: Path) -> None:
    captions_path = write_captions(tmp_path / "captions.parquet")
    settings = attributes.LLMSettings(
        model=llm, prompt=PHASE1, max_new_tokens=12, batch_size=4, backend="vllm", engine=ENGINE
    )
    place = deployment(tmp_path)
    runs = []
    for name, options in (("a", settings), ("b", replace(settings, batch_size=1))):
        out = tmp_path / f"{name}.parquet"
        attributes.run_phase1(captions_path, out, options, "000000", place)
        runs.append([r["raw_answer"] for r in captions(out)])
    other = tmp_path / "c.parquet"
    attributes.run_phase1(captions_path, other, replace(settings, seed=7), "000000", place)
    assert runs[0] == runs[1]  # batching does not change a sampled answer
    assert [r["raw_answer"] for r in captions(other)] != runs[0]


def test_a_meta_checkpoint_with_the_vllm_backend_is_refused(
    demo_models: dict[str, str], tmp_path: Path
) -> None:
    captions_path = write_captions(tmp_path / "captions.parquet")
    settings = attributes.LLMSettings(model=demo_models["metallama"], prompt=PHASE1, backend="vllm")
    with pytest.raises(ValueError, match=r"Meta-format checkpoint.*transformers folder"):
        attributes.run_phase1(captions_path, tmp_path / "o.parquet", settings, "000000")


def test_an_engine_that_cannot_start_fails_the_job_with_its_last_error_line(
    shard: Path, tmp_path: Path
) -> None:
    settings = CaptionSettings(
        model=LLAVA, prompt="Describe.", backend="vllm", engine={"max_model_len": 999999}
    )
    with pytest.raises(engine.EngineError, match=r"exited with code \d+: .*999999"):
        caption.run(shard, tmp_path / "o.parquet", settings, "000000", deployment(tmp_path))
    assert not (tmp_path / "o.parquet").exists()
    missing = engine.Deployment(command="/nowhere/python", log_path=str(tmp_path / "x.log"))
    with pytest.raises(engine.EngineError, match="make setup-vllm"):
        caption.run(shard, tmp_path / "o.parquet", settings, "000000", missing)


KILLED_RUN = """
import sys
from vlmflow.stages import caption
from vlmflow.core import engine
settings = caption.CaptionSettings(**{settings!r})
caption.run({shard!r}, {out!r}, settings, "000000", engine.Deployment({command!r}, {log!r}))
"""


def test_a_shard_stopped_mid_way_resumes_to_the_same_rows(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "000000.tar", 40)
    options = {
        "model": LLAVA,
        "prompt": "Describe the image.",
        "max_new_tokens": 32,
        "batch_size": 2,
        "backend": "vllm",
        # A window of 4: rows reach the progress file 4 at a time, so the job is stopped
        # with part of the shard saved.
        "engine": {**ENGINE, "max_num_seqs": 4},
    }
    whole = tmp_path / "whole.parquet"
    caption.run(shard, whole, CaptionSettings(**options), "000000", deployment(tmp_path))
    out = tmp_path / "resumed.parquet"
    script = KILLED_RUN.format(
        settings=options,
        shard=str(shard),
        out=str(out),
        command=PYTHON,
        log=str(tmp_path / "k.log"),
    )
    job = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    progress = progress_path(out)
    deadline = time.monotonic() + 600
    while not (progress.exists() and progress.read_text().count("\n") >= 2):
        assert job.poll() is None, "the job ended before its first batches"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)  # as Slurm stops a job: progress kept, engine stopped
    assert job.wait(timeout=120) != 0
    assert not out.exists()
    done_before = progress.read_text().count("\n") - 1  # the header line
    caption.run(shard, out, CaptionSettings(**options), "000000", deployment(tmp_path))
    assert captions(out) == captions(whole)
    assert 1 <= done_before < 40
    # No engine outlives its job.
    left = subprocess.run(["pgrep", "-f", "engine_worker.py"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


# Sizes whose tile grids differ: 1 tile; 2x1 + thumbnail; 3x2 + thumbnail (9 and 12 tiles);
# a 4K frame (40 tiles: 8x5 + thumbnail).
V15_IMAGES = [(64, 64), (900, 448), (3000, 2000), (3840, 2160)]


@pytest.mark.parametrize("max_tiles", [None, 2, 40], ids=["model-default", "2", "4k"])
def test_internvl_chat_v15_runs_on_vllm_with_the_seeds_tiling(
    max_tiles: int | None, tmp_path: Path
) -> None:
    """InternVL-Chat-V1.5 (InternViT + MLP + InternLM2, remote config and tokenizer) in
    miniature: the hf backend refuses it with transformers 5's error, the vllm backend
    routes it to vLLM's own implementation, and vLLM cuts every image into the tiles
    ``internvl_chat.dynamic_tiles`` (the model cards' algorithm, what the seed ran) gives
    for the same budget: 256 image tokens per tile, thumbnail included."""
    settings = CaptionSettings(
        model=V15, prompt="Describe the image.", max_tiles=max_tiles, trust_remote_code=True
    )
    with pytest.raises(ValueError, match="InternLM2ForCausalLM' object has no attribute"):
        caption.resolve_route(settings)
    vllm = replace(settings, backend="vllm", engine={"max_model_len": 12288})
    assert caption.resolve_route(vllm) == caption.INTERNVL_CHAT
    budget = max_tiles or 12  # the miniature's config.json: max_dynamic_patch 12
    with ExitStack() as stack:
        session = engine.open_session(
            vllm,
            deployment(tmp_path),
            stack,
            extra=internvl_chat.vllm_engine_options(max_tiles),
        )
        images = [Image.new("RGB", size, (40, 120, 200)) for size in V15_IMAGES]
        tiles = [len(internvl_chat.dynamic_tiles(image, 448, budget)) for image in images]
        text = {
            prompt_tokens(session, image) - 256 * n for image, n in zip(images, tiles, strict=True)
        }
    assert len(text) == 1, (tiles, text)  # the same template around each image
    assert len(set(tiles)) >= 2 and max(tiles) <= budget + 1


def prompt_tokens(session: engine.Session, image: Image.Image) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    message = {"messages": [{"role": "user", "content": content}]}
    ident = session.engine.submit(message | {"sampling": session.sampling.params(0)})
    answer = session.engine.answer(600)
    assert answer.ident == ident and not isinstance(answer.result, str), answer
    return answer.prompt_tokens
