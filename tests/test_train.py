"""Tests for the training stage: a tiny LLaVA trained on H5 files built by the h5 stage."""

from __future__ import annotations

import io
import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from vlmflow.core import h5_layout, vision
from vlmflow.core.io import read_json, write_rows_parquet
from vlmflow.core.models import IMAGE, save_llava
from vlmflow.core.progress import Interrupted
from vlmflow.stages import h5, train
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
from vlmflow.stages.h5 import H5Settings, TokenIds, pack
from vlmflow.stages.train import H5Source, TrainSettings

KEYS = [f"k{n:03d}" for n in range(5)]
LABELS = {
    "k000": ["dog", "green grass"],
    "k001": ["red car", "building", "street"],
    "k002": ["flower", "leaf"],
    "k003": ["cat", "sofa", "window"],
    "k004": ["mountain", "lake", "snow"],
}
P = 16


@dataclass(frozen=True)
class H5Files:
    phase1: H5Source
    phase2: H5Source


def _jpeg(colour: tuple[int, int, int], width: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, 30), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def h5_files(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, str]) -> H5Files:
    """One shard through the h5 stage (module-scoped: the shard_tar fixture is per test)."""
    root = tmp_path_factory.mktemp("train-data")
    tar = root / "000000.tar"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (90, 90, 90)]
    with wds.TarWriter(str(tar)) as writer:
        for number, (key, colour) in enumerate(zip(KEYS, colours, strict=True)):
            writer.write(
                {
                    "__key__": key,
                    "jpg": _jpeg(colour, 40 + 7 * number),
                    "txt": f"web caption {number}",
                    "json": json.dumps({"key": key}),
                }
            )
    common = {"model": "llm", "prompt_id": "p", "failure": None, "raw_answer": ""}
    phase1 = [
        {**common, "key": k, "web_caption": "w", "vlm_caption": "v", "attributes": LABELS[k]}
        for k in KEYS
    ]
    phase2 = [
        {
            **common,
            "key": k,
            "phase1_attributes": LABELS[k],
            "phase2_attributes": [],
            "attributes": LABELS[k],
            "attribute_sources": ["phase1"] * len(LABELS[k]),
        }
        for k in KEYS
    ]
    write_rows_parquet(root / "phase1.parquet", phase1, PHASE1_SCHEMA)
    write_rows_parquet(root / "phase2.parquet", phase2, PHASE2_SCHEMA)
    out = root / "h5"
    h5.run_shard(
        tar,
        root / "phase1.parquet",
        root / "phase2.parquet",
        demo_models["lm"],
        demo_models["vision"],
        H5Settings(max_seq_len=128),
        "000000",
        out / "phase1" / "000000.h5",
        out / "phase2" / "000000.h5",
        out / "images" / "000000",
        out / "params" / "000000.json",
    )
    return H5Files(
        phase1=H5Source(out / "phase1" / "000000.h5", out / "images"),
        phase2=H5Source(out / "phase2" / "000000.h5", out / "images"),
    )


PHASE1 = TrainSettings(phase=1, epochs=2, batch_size=2, lr=1e-2, seed=3)
PHASE2 = TrainSettings(phase=2, epochs=1, batch_size=2, lr=1e-2, seed=3)


@pytest.fixture(scope="module")
def phase1_model(
    tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, str], h5_files: H5Files
) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("phase1") / "model"
    history = train.run(
        [h5_files.phase1],
        out,
        PHASE1,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    return out, history


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _is_projector(name: str) -> bool:
    return "multi_modal_projector" in name


def _is_vision(name: str) -> bool:
    return "vision_tower" in name


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def test_model_inputs_replaces_exactly_the_patch_slots() -> None:
    ids = TokenIds(bos=0, eos=1, pad=2)
    phase1 = pack([0], 3, [], [10, 11], ids, max_seq_len=10)
    phase2 = pack([0, 50, 51], 3, [60], [70], ids, max_seq_len=10)
    assert phase1 is not None
    assert phase2 is not None
    rows = torch.from_numpy(np.stack([phase1.rows, phase2.rows])).long()
    before = rows.clone()
    inputs = train.model_inputs(rows, pad_id=2, image_token_id=99, num_patches=3)
    assert inputs["input_ids"].tolist() == [
        [0, 99, 99, 99, 10, 11, 2, 2, 2, 2],
        [0, 50, 51, 99, 99, 99, 60, 70, 2, 2],
    ]
    assert inputs["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
    ]
    assert torch.equal(inputs["labels"], rows[:, h5_layout.LABELS])
    assert torch.equal(inputs["loss_mask"], rows[:, h5_layout.LOSS_MASK])
    assert torch.equal(rows, before)  # the H5 rows themselves are not modified


def test_masked_loss_is_the_mean_over_masked_positions() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [0.0, 3.0, 1.0], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[0, 1, 2, 2]])
    mask = torch.tensor([[1, 0, 1, 0]])

    def nll(row: list[float], label: int) -> float:
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    expected = (nll([2.0, 0.0, -1.0], 0) + nll([0.0, 3.0, 1.0], 2)) / 2
    assert float(train.masked_loss(logits, labels, mask)) == pytest.approx(expected, rel=1e-6)
    # Nothing to train on: zero, not NaN.
    assert float(train.masked_loss(logits, labels, torch.zeros_like(mask))) == 0.0


# ---------------------------------------------------------------------------
# build_llava
# ---------------------------------------------------------------------------


def test_build_llava_reuses_the_pretrained_towers(demo_models: dict[str, str]) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model, processor = train.build_llava(demo_models["vision"], demo_models["lm"], PHASE1)
    model.eval()
    lm = AutoModelForCausalLM.from_pretrained(demo_models["lm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_models["lm"])
    ids = tokenizer("a red car parked on a city street", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ours = model(input_ids=ids).logits
        theirs = lm(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)

    vision = AutoModel.from_pretrained(demo_models["vision"])
    ours_vision = model.model.vision_tower.state_dict()
    for name, tensor in vision.state_dict().items():
        assert torch.equal(ours_vision[name], tensor), name

    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids(IMAGE)
    assert set(model.generation_config.eos_token_id) == set(lm.generation_config.eos_token_id)
    # The processor expands one <image> into one token per patch.
    text = f"{IMAGE} a photo"
    batch = processor(images=[Image.new("RGB", (40, 30))], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == P


def test_build_llava_projector_depends_on_the_seed(demo_models: dict[str, str]) -> None:
    def projector(seed: int) -> dict[str, torch.Tensor]:
        settings = TrainSettings(phase=1, seed=seed)
        model, _ = train.build_llava(demo_models["vision"], demo_models["lm"], settings)
        return model.model.multi_modal_projector.state_dict()

    first, again, other = projector(0), projector(0), projector(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["linear_1.weight"], other["linear_1.weight"])


# ---------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------


def test_h5_examples_pair_rows_with_their_images(
    demo_models: dict[str, str], h5_files: H5Files
) -> None:
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(demo_models["vision"])
    dataset = train.H5Examples([h5_files.phase1, h5_files.phase2], image_processor)
    assert len(dataset) == 10
    with h5py.File(h5_files.phase2.path, "r") as f:
        expected_rows = f["data"][4]
        relative = f["img_path"][4, 0].decode()
    item = dataset[9]  # the last row of the second file
    assert item["rows"].dtype == torch.int64
    assert item["rows"].tolist() == expected_rows.tolist()
    assert relative == "000000/k004.jpg"
    with Image.open(h5_files.phase2.image_root / relative) as img:
        expected_pixels = image_processor(images=img.convert("RGB"), return_tensors="pt")
    assert torch.equal(item["pixel_values"], expected_pixels["pixel_values"][0])
    assert tuple(item["pixel_values"].shape) == (3, 32, 32)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_load_image_gives_pillows_draft_pixels(tmp_path: Path, mode: str) -> None:
    """simplejpeg's DCT-scaled decode must be the very pixels of Pillow's draft mode (the
    loader, the feature writer and eval all see an image alike); grey JPEGs come out RGB
    and CMYK ones (which libjpeg-turbo cannot make RGB) go through Pillow."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.jpg"
    picture.save(path, format="JPEG", quality=90)
    decoded = vision.load_image(path, 32)
    with Image.open(path) as img:
        img.draft("RGB", (32, 32))
        expected = np.asarray(img.convert("RGB"))
    assert decoded.shape == expected.shape == (75, 50, 3)  # 1/4 scale: both sides >= 32
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected)
    png = tmp_path / "x.png"
    picture.convert("RGB").save(png)
    assert vision.load_image(png, 32).shape == (300, 200, 3)


def test_a_text_only_row_is_fed_a_black_image(
    tmp_path: Path, demo_models: dict[str, str], h5_files: H5Files
) -> None:
    """Cerebras' convention: img_path ``None`` marks a text-only sample; the reader feeds a
    black image, so its rows keep the patch slots and it trains like any other."""
    from transformers import AutoImageProcessor

    with h5py.File(h5_files.phase2.path, "r") as f:
        data, paths = f["data"][:2], [f["img_path"][0, 0].decode(), None]
    path = tmp_path / "mixed.h5"
    h5_layout.write_rows(path, data, paths)
    with h5py.File(path, "r") as f:
        assert f["img_path"][1, 0] == b"None"
    image_processor = AutoImageProcessor.from_pretrained(demo_models["vision"])
    dataset = train.H5Examples([H5Source(path, h5_files.phase2.image_root)], image_processor)
    black = image_processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")
    assert torch.equal(dataset[1]["pixel_values"], black["pixel_values"][0])
    assert not torch.equal(dataset[0]["pixel_values"], dataset[1]["pixel_values"])
    assert dataset[1]["rows"].tolist() == data[1].tolist()
    history = train.run(
        [H5Source(path, h5_files.phase2.image_root)],
        tmp_path / "model",
        replace(PHASE1, epochs=1),
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    assert len(history) == 1 and math.isfinite(history[0]["loss"])


# ---------------------------------------------------------------------------
# run(): phase 1 then phase 2
# ---------------------------------------------------------------------------


def test_phase1_trains_the_projector_only(
    demo_models: dict[str, str], phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, _ = phase1_model
    fresh, _ = train.build_llava(demo_models["vision"], demo_models["lm"], PHASE1)
    # Keys as the train stage writes them (the hub's LLaVA names).
    fresh_folder = folder.parent / "fresh"
    fresh_folder.mkdir()
    save_llava(fresh, fresh_folder)
    before, after = _weights(fresh_folder), _weights(folder)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed
    assert all(_is_projector(name) for name in changed), sorted(changed)
    assert {name for name in before if _is_projector(name)} == changed


def test_phase1_writes_one_metrics_line_per_step(
    phase1_model: tuple[Path, list[dict[str, Any]]],
) -> None:
    folder, history = phase1_model
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    # 5 examples in batches of 2 -> 3 optimiser steps per epoch, 2 epochs.
    assert len(entries) == 6
    assert entries == history
    assert [e["step"] for e in entries] == list(range(1, 7))
    assert [e["epoch"] for e in entries] == [0, 0, 0, 1, 1, 1]
    for entry in entries:
        assert entry["phase"] == 1
        assert math.isfinite(entry["loss"])
        assert entry["loss"] > 0
        assert 0.0 <= entry["lr"] <= PHASE1.lr
        assert entry["tokens_per_s"] > 0
    params = read_json(folder / "train_params.json")
    assert params["steps"] == 6
    assert params["examples"] == 5
    assert params["settings"]["phase"] == 1
    assert params["init_from"] is None


def test_gradient_accumulation_counts_optimiser_steps(
    tmp_path: Path, demo_models: dict[str, str], h5_files: H5Files
) -> None:
    settings = TrainSettings(phase=1, epochs=1, batch_size=2, grad_accum=2)
    history = train.run(
        [h5_files.phase1],
        tmp_path / "model",
        settings,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    # 3 micro-batches: one full accumulation, then the short remainder still steps.
    assert [e["step"] for e in history] == [1, 2]
    lines = (tmp_path / "model" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2


def test_same_seed_gives_the_same_losses(
    tmp_path: Path,
    demo_models: dict[str, str],
    h5_files: H5Files,
    phase1_model: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, history = phase1_model
    again = train.run(
        [h5_files.phase1],
        tmp_path / "again",
        PHASE1,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    assert [e["loss"] for e in again] == [e["loss"] for e in history]
    first, second = _weights(phase1_model[0]), _weights(tmp_path / "again")
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = train.run(
        [h5_files.phase1],
        tmp_path / "other",
        replace(PHASE1, seed=4),
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    assert [e["loss"] for e in other] != [e["loss"] for e in history]


def _losses(history: list[dict[str, Any]]) -> list[tuple[int, int, float, float]]:
    return [(e["step"], e["epoch"], e["loss"], e["lr"]) for e in history]


def _crash_at_loss_call(monkeypatch: pytest.MonkeyPatch, call: int, action: Any) -> None:
    """Run ``action`` in the ``call``-th loss computation (1-based) of the next run."""
    real = train.masked_loss
    calls = [0]

    def wrapped(*args: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(*args)

    monkeypatch.setattr("vlmflow.stages.train.trainer.masked_loss", wrapped)  # where it is called


def die() -> None:
    raise KeyboardInterrupt("killed")  # caught nowhere: stands in for SIGKILL


def test_killed_run_resumes_from_its_checkpoint_with_the_same_losses(
    tmp_path: Path,
    demo_models: dict[str, str],
    h5_files: H5Files,
    phase1_model: tuple[Path, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, uninterrupted = phase1_model
    out = tmp_path / "model"
    kwargs: dict[str, Any] = {
        "vision_tower": demo_models["vision"],
        "language_model": demo_models["lm"],
        "checkpoint_every": 2,
    }

    # 6 steps of one batch each; dies computing step 5, after the step-4 checkpoint.
    _crash_at_loss_call(monkeypatch, 5, die)
    with pytest.raises(KeyboardInterrupt):
        train.run([h5_files.phase1], out, PHASE1, **kwargs)
    checkpoints = tmp_path / ".model.checkpoint"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000004"]
    assert not out.exists()

    monkeypatch.undo()
    resumed = train.run([h5_files.phase1], out, PHASE1, **kwargs)
    # The whole loss sequence, across the restart (step 4 is mid-way through epoch 1),
    # equals the run that was never stopped, and so do the weights.
    assert _losses(resumed) == _losses(uninterrupted)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    first, second = _weights(folder), _weights(out)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not checkpoints.exists(), "a finished phase removes its checkpoint"


def test_sigterm_saves_a_checkpoint_and_stops_then_the_rerun_continues(
    tmp_path: Path,
    demo_models: dict[str, str],
    h5_files: H5Files,
    phase1_model: tuple[Path, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, uninterrupted = phase1_model
    out = tmp_path / "model"
    kwargs: dict[str, Any] = {
        "vision_tower": demo_models["vision"],
        "language_model": demo_models["lm"],
        "checkpoint_every": 0,  # no periodic checkpoints: only the one SIGTERM asks for
    }
    _crash_at_loss_call(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted, match="after step 3"):
        train.run([h5_files.phase1], out, PHASE1, **kwargs)
    assert [p.name for p in (tmp_path / ".model.checkpoint").iterdir()] == ["step-00000003"]
    monkeypatch.undo()
    # The handler is the previous one again once training stops.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = train.run([h5_files.phase1], out, PHASE1, **kwargs)
    assert _losses(resumed) == _losses(uninterrupted)


def test_a_checkpoint_of_other_settings_is_not_resumed(
    tmp_path: Path,
    demo_models: dict[str, str],
    h5_files: H5Files,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "model"
    kwargs: dict[str, Any] = {
        "vision_tower": demo_models["vision"],
        "language_model": demo_models["lm"],
        "checkpoint_every": 1,
    }

    _crash_at_loss_call(monkeypatch, 3, die)
    with pytest.raises(KeyboardInterrupt):
        train.run([h5_files.phase1], out, PHASE1, **kwargs)
    monkeypatch.undo()
    other = replace(PHASE1, lr=2e-2)
    history = train.run([h5_files.phase1], out, other, **kwargs)
    fresh = train.run([h5_files.phase1], tmp_path / "fresh", other, **kwargs)
    assert _losses(history) == _losses(fresh)


def test_phase1_from_precomputed_features_never_runs_the_vision_tower(
    tmp_path: Path,
    demo_models: dict[str, str],
    h5_files: H5Files,
    phase1_model: tuple[Path, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import CLIPVisionModel

    # The same shard packed again, its phase-1 file with the tower's features.
    source = h5_files.phase1.path
    out = tmp_path / "h5"
    h5.run_shard(
        source.parent.parent.parent / "000000.tar",
        source.parent.parent.parent / "phase1.parquet",
        source.parent.parent.parent / "phase2.parquet",
        demo_models["lm"],
        demo_models["vision"],
        H5Settings(max_seq_len=128, vision_features=True),
        "000000",
        out / "phase1" / "000000.h5",
        out / "phase2" / "000000.h5",
        out / "images" / "000000",
        out / "params" / "000000.json",
        vision_feature_layer=PHASE1.vision_feature_layer,
    )

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the vision tower ran")

    monkeypatch.setattr(CLIPVisionModel, "forward", boom)
    history = train.run(
        [H5Source(out / "phase1" / "000000.h5", out / "images")],
        tmp_path / "model",
        PHASE1,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    # The same losses as from the images, but for float16 storage of the features.
    _, from_images = phase1_model
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in from_images], rel=2e-3)


def test_phase2_trains_projector_and_language_model(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    phase1_folder, _ = phase1_model
    out = tmp_path / "phase2"
    history = train.run([h5_files.phase2], out, PHASE2, init_from=str(phase1_folder))
    assert len(history) == 3
    assert all(e["phase"] == 2 for e in history)
    assert read_json(out / "train_params.json")["init_from"] == str(phase1_folder)

    before, after = _weights(phase1_folder), _weights(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any(_is_vision(name) for name in changed)
    assert any(_is_projector(name) for name in changed)
    assert any("language_model" in name for name in changed)
    assert any(name.endswith("lm_head.weight") for name in changed)

    # Any transformers user can load the result.
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (40, 30))], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == P
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_linear_projector_and_truncated_language_model(
    tmp_path: Path, demo_models: dict[str, str], h5_files: H5Files
) -> None:
    """nxtp's shape: an affine projector and the LM's first layers only."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    settings = replace(PHASE1, epochs=1, projector="linear", language_model_layers=1)
    model, _ = train.build_llava(demo_models["vision"], demo_models["lm"], settings)
    # The projector is an affine map: f(a x + b y) = a f(x) + b f(y) + (1 - a - b) f(0).
    projector = model.model.multi_modal_projector.eval()
    x, y, zero = torch.randn(3, 32), torch.randn(3, 32), torch.zeros(3, 32)
    with torch.no_grad():
        combined = projector(2 * x - 0.5 * y)
        expected = 2 * projector(x) - 0.5 * projector(y) - 0.5 * projector(zero)
    assert torch.allclose(combined, expected, atol=1e-5)
    # The truncated LM computes what the full LM's first layer computes.
    full = AutoModelForCausalLM.from_pretrained(demo_models["lm"]).eval()
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.inference_mode():
        ours = model.model.language_model(input_ids=ids, output_hidden_states=True)
        theirs = full.model(input_ids=ids, output_hidden_states=True)
    assert len(ours.hidden_states) == 2  # embeddings + one layer
    # The last hidden state is after the final norm.
    with torch.inference_mode():
        first_layer = full.model.norm(theirs.hidden_states[1])
    assert torch.allclose(ours.last_hidden_state, first_layer, atol=1e-5)
    assert not torch.allclose(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-3)

    out = tmp_path / "model"
    train.run(
        [h5_files.phase1],
        out,
        settings,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert loaded.config.text_config.num_hidden_layers == 1
    assert loaded.config.projector_hidden_act == "linear"
    assert len(loaded.model.language_model.layers) == 1


def test_phase2_with_lora_trains_adapters_and_saves_plain_llava(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    from transformers import LlavaForConditionalGeneration

    phase1_folder, _ = phase1_model
    settings = replace(PHASE2, lora_rank=4, lora_alpha=8)
    model, _ = train.load_llava(str(phase1_folder))
    chosen = {id(p) for p in train.set_trainable(model, settings)}
    trainable = {name for name, p in model.named_parameters() if id(p) in chosen}
    assert trainable
    assert all("lora_" in name or _is_projector(name) for name in trainable), sorted(trainable)
    assert any("lora_A" in name for name in trainable)

    out = tmp_path / "lora"
    history = train.run([h5_files.phase2], out, settings, init_from=str(phase1_folder))
    assert len(history) == 3 and all(math.isfinite(e["loss"]) for e in history)
    before, after = _weights(phase1_folder), _weights(out)
    # Merged into the LM's own weights: the folder has exactly the keys of plain LLaVA.
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("self_attn.q_proj" in name for name in changed)
    assert not any(name.endswith("lm_head.weight") for name in changed)
    assert not any("embed_tokens" in name or "norm" in name for name in changed)
    assert not any(_is_vision(name) for name in changed)
    LlavaForConditionalGeneration.from_pretrained(out)


def test_phase2_trains_the_top_vision_blocks_that_feed_the_projector(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    phase1_folder, _ = phase1_model
    settings = replace(PHASE2, vision_trainable_blocks=1)
    out = tmp_path / "vision"
    train.run([h5_files.phase2], out, settings, init_from=str(phase1_folder))
    before, after = _weights(phase1_folder), _weights(out)
    changed_vision = {
        name for name in before if _is_vision(name) and not torch.equal(before[name], after[name])
    }
    # 2 blocks and vision_feature_layer -2: block 0 feeds the projector, block 1 does not.
    assert changed_vision
    assert all(".layers.0." in name for name in changed_vision), sorted(changed_vision)
    with pytest.raises(ValueError, match="1 blocks feed the projector"):
        train.run(
            [h5_files.phase2],
            tmp_path / "too-many",
            replace(settings, vision_trainable_blocks=2),
            init_from=str(phase1_folder),
        )
    with pytest.raises(ValueError, match="phase 1 trains the projector only"):
        replace(PHASE1, lora_rank=4)


def test_run_refuses_an_empty_data_set(tmp_path: Path, demo_models: dict[str, str]) -> None:
    empty = tmp_path / "empty.h5"
    h5.write_h5(empty, [], [], 64)
    with pytest.raises(ValueError, match="skipped"):
        train.run(
            [H5Source(empty, tmp_path)],
            tmp_path / "model",
            PHASE1,
            vision_tower=demo_models["vision"],
            language_model=demo_models["lm"],
        )
    assert not (tmp_path / "model").exists()


def test_run_needs_a_model_to_start_from(tmp_path: Path, h5_files: H5Files) -> None:
    with pytest.raises(ValueError, match="init_from"):
        train.run([h5_files.phase1], tmp_path / "model", PHASE1)


def test_two_processes_train_one_model_with_gloo(
    tmp_path: Path, demo_models: dict[str, str], h5_files: H5Files
) -> None:
    # The same path as a Slurm job with `mpi: srun`, started here by torchrun on the CPU.
    job = train.TrainJob(
        [h5_files.phase1],
        str(tmp_path / "model"),
        PHASE1,
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    log_file = tmp_path / "train.log"
    with open(log_file, "w", encoding="utf-8") as handle:
        train.launch(job, "torchrun --standalone --nproc-per-node=2", handle)
    text = log_file.read_text(encoding="utf-8")
    assert "rank 0 of 2" in text and "rank 1 of 2" in text
    entries = [
        json.loads(line)
        for line in (tmp_path / "model" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    # 5 examples padded to 6 over 2 ranks, 1 per rank per step -> 3 steps per epoch.
    assert [e["step"] for e in entries] == list(range(1, 7))
    assert all(e["processes"] == 2 and math.isfinite(e["loss"]) for e in entries)
    assert read_json(tmp_path / "model" / "train_params.json")["processes"] == 2
    assert not list(tmp_path.glob(".model*")), "the job file and temp dirs are cleaned up"
    model, _ = train.load_llava(str(tmp_path / "model"))
    assert model.config.image_token_index is not None


TWO_PROCESSES = "torchrun --standalone --nproc-per-node=2"


def _metrics(folder: Path) -> list[tuple[int, float, float]]:
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(e["step"], e["loss"], e["lr"]) for e in map(json.loads, lines)]


def _stop_by_sigterm_and_relaunch(
    tmp_path: Path, make_job: Callable[[str], train.TrainJob]
) -> tuple[Path, list[str]]:
    """Run ``make_job("reference")`` on 2 processes undisturbed; launch
    ``make_job("stopped")`` the same way, SIGTERM the whole launch (as Slurm signals a
    job) once its first checkpoint is complete, check it stopped with a checkpoint, then
    relaunch it to the end; returns the stopped job's output folder and the checkpoint's
    files."""
    with open(tmp_path / "reference.log", "w", encoding="utf-8") as handle:
        train.launch(make_job("reference"), TWO_PROCESSES, handle)
    job = make_job("stopped")
    import subprocess
    import time

    from vlmflow.core import distributed
    from vlmflow.core.io import write_json

    out = Path(job.out_dir)
    spec = tmp_path / f"{out.name}.json"
    write_json(spec, job.to_json())
    argv, env = distributed.launch_command(TWO_PROCESSES, "vlmflow.stages.train", [str(spec)])
    checkpoints = out.parent / f".{out.name}.checkpoint"
    first = checkpoints / f"step-{job.checkpoint_every:08d}" / "complete.json"
    with open(tmp_path / "stopped.log", "w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            argv, env=env, stdout=handle, stderr=handle, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while not first.exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) != 0
    log = (tmp_path / "stopped.log").read_text(encoding="utf-8")
    assert "SIGTERM: stopped after step" in log
    saved = sorted(p.name for p in checkpoints.iterdir())
    assert len(saved) == 1, saved
    files = sorted(p.name for p in (checkpoints / saved[0]).iterdir())
    assert not out.exists()

    with open(tmp_path / "resumed.log", "w", encoding="utf-8") as handle:
        train.launch(job, TWO_PROCESSES, handle)
    assert "resuming from" in (tmp_path / "resumed.log").read_text(encoding="utf-8")
    assert not checkpoints.exists()
    return out, files


def test_two_processes_stopped_by_sigterm_resume_with_the_same_losses(
    tmp_path: Path, demo_models: dict[str, str], h5_files: H5Files
) -> None:
    """DDP over gloo: SIGTERM to the whole launch makes every rank save at the same step
    and exit non-zero; the relaunch logs the losses of a run that was never stopped."""
    settings = replace(PHASE1, epochs=12)  # 36 steps: time to be stopped mid-way

    def job(name: str) -> train.TrainJob:
        return train.TrainJob(
            [h5_files.phase1],
            str(tmp_path / name),
            settings,
            vision_tower=demo_models["vision"],
            language_model=demo_models["lm"],
            checkpoint_every=3,
        )

    stopped, files = _stop_by_sigterm_and_relaunch(tmp_path, job)
    assert files == ["complete.json", "rank-0.pt", "rank-1.pt", "trainable.safetensors"]
    assert _metrics(stopped) == _metrics(tmp_path / "reference")
    assert len(_metrics(stopped)) == 36


def test_fsdp_stopped_by_sigterm_resumes_from_sharded_checkpoints(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    """FSDP over gloo: each rank writes its shards of the weights and optimiser state
    (torch.distributed.checkpoint); the relaunch reads them back and logs the losses of
    the run that was never stopped, ending with the same weights."""
    phase1_folder, _ = phase1_model
    settings = replace(PHASE2, epochs=8)  # 24 steps

    def job(name: str) -> train.TrainJob:
        return train.TrainJob(
            [h5_files.phase2],
            str(tmp_path / name),
            settings,
            init_from=str(phase1_folder),
            checkpoint_every=3,
            fsdp=True,
        )

    stopped, files = _stop_by_sigterm_and_relaunch(tmp_path, job)
    # No rank holds whole weights: no trainable.safetensors, the shards instead.
    assert files == ["complete.json", "rank-0.pt", "rank-1.pt", "sharded"]
    assert _metrics(stopped) == _metrics(tmp_path / "reference")
    assert len(_metrics(stopped)) == 24
    reference, resumed = _weights(tmp_path / "reference"), _weights(stopped)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_fsdp_over_two_processes_trains_as_ddp_does(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    """Phase 2 (projector + LM) with parameters sharded by FSDP over 2 gloo processes:
    the same losses as DDP's full copies, and a plain LLaVA folder at the end."""
    from transformers import LlavaForConditionalGeneration

    phase1_folder, _ = phase1_model
    launcher = TWO_PROCESSES
    histories = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        job = train.TrainJob(
            [h5_files.phase2], str(tmp_path / name), PHASE2, init_from=str(phase1_folder), fsdp=fsdp
        )
        with open(tmp_path / f"{name}.log", "w", encoding="utf-8") as handle:
            train.launch(job, launcher, handle)
        lines = (tmp_path / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        histories[name] = [json.loads(line) for line in lines]
    assert "FSDP: parameters, gradients and optimiser state sharded over 2 ranks" in (
        tmp_path / "fsdp.log"
    ).read_text(encoding="utf-8")
    assert [e["loss"] for e in histories["fsdp"]] == pytest.approx(
        [e["loss"] for e in histories["ddp"]], rel=1e-4
    )
    ddp, fsdp = _weights(tmp_path / "ddp"), _weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    assert all(torch.allclose(ddp[k], fsdp[k], atol=1e-4) for k in ddp)
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "fsdp")


def test_fsdp_with_lora_trains_as_ddp_does_and_saves_merged_weights(
    tmp_path: Path, h5_files: H5Files, phase1_model: tuple[Path, list[dict[str, Any]]]
) -> None:
    phase1_folder, _ = phase1_model
    settings = replace(PHASE2, lora_rank=4, lora_alpha=8)
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        job = train.TrainJob(
            [h5_files.phase2],
            str(tmp_path / name),
            settings,
            init_from=str(phase1_folder),
            fsdp=fsdp,
        )
        with open(tmp_path / f"{name}.log", "w", encoding="utf-8") as handle:
            train.launch(job, TWO_PROCESSES, handle)
    losses = {name: [loss for _, loss, _ in _metrics(tmp_path / name)] for name in ("ddp", "fsdp")}
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-4)
    before, ddp, fsdp = (
        _weights(phase1_folder),
        _weights(tmp_path / "ddp"),
        _weights(tmp_path / "fsdp"),
    )
    # Plain LLaVA keys (adapters merged), the LM's projections changed, as under DDP.
    assert before.keys() == ddp.keys() == fsdp.keys()
    assert any("self_attn.q_proj" in k and not torch.equal(before[k], fsdp[k]) for k in before)
    assert all(torch.allclose(ddp[k], fsdp[k], atol=1e-4) for k in ddp)


def test_a_failing_rank_fails_the_launch(tmp_path: Path, h5_files: H5Files) -> None:
    job = train.TrainJob([h5_files.phase1], str(tmp_path / "model"), PHASE1)  # no model given
    with (
        open(tmp_path / "train.log", "w", encoding="utf-8") as handle,
        pytest.raises(RuntimeError, match=r"vlmflow\.stages\.train processes failed"),
    ):
        train.launch(job, "torchrun --standalone --nproc-per-node=2", handle)
    assert "needs init_from" in (tmp_path / "train.log").read_text(encoding="utf-8")
    assert not (tmp_path / "model").exists()
