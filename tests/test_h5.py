"""Tests for the HDF5 stage: Cerebras ModelZoo's LLaVA layout, token by token."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image

from vlmflow.core import prompts
from vlmflow.core.h5_layout import INPUT_IDS, KEY_PADDING_MASK, LABELS, LOSS_MASK
from vlmflow.core.io import read_json, write_rows_parquet
from vlmflow.core.prompts import VICUNA_V1_SYSTEM, phase2_answer, phase2_prefix, phase2_prompt
from vlmflow.core.shards import iter_samples
from vlmflow.stages import h5
from vlmflow.stages.attributes import PHASE1_SCHEMA, PHASE2_SCHEMA
from vlmflow.stages.h5 import H5Settings, TokenIds, pack

IDS = TokenIds(bos=0, eos=1, pad=2)
INSTRUCTION = "List the objects and attributes in the image."
P = 16  # (32 / 8) ** 2 patches of the demo vision tower


@pytest.fixture(scope="module")
def tokenizer(demo_models: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_models["lm"])


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------
# pack: the row layout
# ---------------------------------------------------------------------------


def test_pack_phase1_layout_by_hand() -> None:
    example = pack([0], 3, [], [10, 11], IDS, max_seq_len=10)
    assert example is not None
    rows = example.rows
    assert rows.dtype == np.int32
    assert rows.shape == (4, 10)
    # tokens = [BOS] + [pad] * 3 + [10, 11] + [EOS]
    assert rows[INPUT_IDS].tolist() == [0, 2, 2, 2, 10, 11, 2, 2, 2, 2]
    assert rows[LABELS].tolist() == [2, 2, 2, 10, 11, 1, 2, 2, 2, 2]
    # No loss on BOS and the first P-1 patch slots; the last patch slot predicts the
    # first text token; the last text token predicts EOS.
    assert rows[LOSS_MASK].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert rows[KEY_PADDING_MASK].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert example.patch_start == 1


def test_pack_phase2_layout_by_hand() -> None:
    example = pack([0, 50, 51], 2, [60, 61], [70], IDS, max_seq_len=12)
    assert example is not None
    rows = example.rows
    assert rows[INPUT_IDS].tolist() == [0, 50, 51, 2, 2, 60, 61, 70, 2, 2, 2, 2]
    assert rows[LABELS].tolist() == [50, 51, 2, 2, 60, 61, 70, 1, 2, 2, 2, 2]
    # Loss only where the label is an answer token or EOS.
    assert rows[LOSS_MASK].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert rows[KEY_PADDING_MASK].tolist() == [0] * 8 + [1] * 4
    assert example.patch_start == 3


def test_pack_discards_over_long_samples_instead_of_truncating() -> None:
    # tokens has 1 + 4 + 5 + 1 = 11 entries: 10 model positions.
    exact = pack([0], 4, [], [5, 6, 7, 8, 9], IDS, max_seq_len=10)
    assert exact is not None
    assert exact.rows[KEY_PADDING_MASK].sum() == 0
    assert exact.rows[LABELS, -1] == IDS.eos
    assert pack([0], 4, [], [5, 6, 7, 8, 9], IDS, max_seq_len=9) is None


def test_phase1_example_with_real_tokenizer(tokenizer: Any) -> None:
    ids = h5.token_ids(tokenizer)
    text = "dog, red car, green grass"
    example = h5.phase1_example(tokenizer, text, P, ids, max_seq_len=64)
    assert example is not None
    rows = example.rows
    text_ids = encode(tokenizer, text)
    tokens = [ids.bos] + [ids.pad] * P + text_ids + [ids.eos]
    n = len(tokens) - 1
    assert rows[INPUT_IDS, :n].tolist() == tokens[:-1]
    assert rows[LABELS, :n].tolist() == tokens[1:]
    assert (rows[INPUT_IDS, n:] == ids.pad).all()
    expected_loss = [0] * P + [1] * (len(text_ids) + 1) + [0] * (64 - n)
    assert rows[LOSS_MASK].tolist() == expected_loss
    assert rows[KEY_PADDING_MASK].tolist() == [0] * n + [1] * (64 - n)
    assert tokenizer.decode(rows[LABELS][rows[LOSS_MASK] == 1][:-1]) == text
    assert h5.phase1_example(tokenizer, text, P, ids, max_seq_len=n - 1) is None


def test_phase2_example_trains_on_the_answer_only(tokenizer: Any) -> None:
    ids = h5.token_ids(tokenizer)
    labels = ["dog", "red car", "grass"]
    example = h5.phase2_example(tokenizer, INSTRUCTION, labels, P, ids, max_seq_len=160)
    assert example is not None
    rows = example.rows
    prefix = [ids.bos, *encode(tokenizer, phase2_prefix())]
    prompt = encode(tokenizer, phase2_prompt(INSTRUCTION))
    answer = encode(tokenizer, phase2_answer(labels))
    assert example.patch_start == len(prefix)
    start = len(prefix)
    assert rows[INPUT_IDS, :start].tolist() == prefix
    assert (rows[INPUT_IDS, start : start + P] == ids.pad).all()
    after = start + P
    assert rows[INPUT_IDS, after : after + len(prompt)].tolist() == prompt
    trained = rows[LABELS][rows[LOSS_MASK] == 1].tolist()
    assert trained == [*answer, ids.eos]
    assert tokenizer.decode(trained[:-1]) == " dog, red car, grass"
    n = len(prefix) + P + len(prompt) + len(answer)
    assert rows[KEY_PADDING_MASK].tolist() == [0] * n + [1] * (160 - n)


def test_phase2_example_in_the_language_models_chat_template(tokenizer: Any) -> None:
    ids = h5.token_ids(tokenizer)
    labels = ["dog", "red car", "grass"]
    example = h5.phase2_example(
        tokenizer, INSTRUCTION, labels, P, ids, max_seq_len=160, style="chat_template"
    )
    assert example is not None
    rows = example.rows
    # The template's own rendering, with the image slot as the patches.
    user = {"role": "user", "content": f"<image>\n{INSTRUCTION}"}
    opened = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    before, _, after = opened.partition("<image>")
    prefix, prompt = encode(tokenizer, before), encode(tokenizer, after)
    assert prefix[0] == ids.bos and example.patch_start == len(prefix)
    assert rows[INPUT_IDS, : len(prefix)].tolist() == prefix
    start = len(prefix) + P
    assert (rows[INPUT_IDS, len(prefix) : start] == ids.pad).all()
    assert rows[INPUT_IDS, start : start + len(prompt)].tolist() == prompt
    assert tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Loss on the answer and the end of turn the template closes it with (not EOS).
    trained = rows[LABELS][rows[LOSS_MASK] == 1].tolist()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert trained[-1] == eot != ids.eos
    assert tokenizer.decode(trained[:-1]) == "dog, red car, grass"

    no_template = SimpleNamespace(chat_template=None, name_or_path="plain-lm")
    with pytest.raises(ValueError, match="phase2_style chat_template: plain-lm has no chat"):
        h5.phase2_example(no_template, INSTRUCTION, labels, P, ids, 160, style="chat_template")


def test_phase2_turns_are_the_texts_of_the_phase2_samples(tokenizer: Any) -> None:
    labels = ["dog", "red car", "grass"]
    turns = prompts.phase2_turns(INSTRUCTION, labels)
    assert turns.user == f"<image>\n{INSTRUCTION}"
    assert turns.answer == "dog, red car, grass"
    # LLaVA's v1 template (system, " USER: ", " ASSISTANT: ", "</s>") gives the vicuna_v1
    # layout the H5 rows are encoded from, the image where the patches go.
    llava_v1 = f"{VICUNA_V1_SYSTEM} USER: {turns.user} ASSISTANT: {turns.answer}"
    assert llava_v1 == (
        phase2_prefix() + "<image>" + phase2_prompt(INSTRUCTION) + phase2_answer(labels)
    )
    # chat_template: the template's rendering of the two turns is what the row holds.
    ids = h5.token_ids(tokenizer)
    example = h5.phase2_example(
        tokenizer, INSTRUCTION, labels, P, ids, max_seq_len=160, style="chat_template"
    )
    assert example is not None
    conversation = [
        {"role": "user", "content": turns.user},
        {"role": "assistant", "content": turns.answer},
    ]
    before, _, after = tokenizer.apply_chat_template(conversation, tokenize=False).partition(
        "<image>"
    )
    rows = example.rows
    length = int((rows[KEY_PADDING_MASK] == 0).sum())
    assert tokenizer.decode(rows[INPUT_IDS, : example.patch_start]) == before
    rendered = tokenizer.decode(
        [*rows[INPUT_IDS, example.patch_start + P : length], rows[LABELS, length - 1]]
    )
    assert after.startswith(rendered) and rendered.endswith("<|eot_id|>")


def test_token_ids_fall_back_to_eos_for_padding() -> None:
    no_pad = SimpleNamespace(bos_token_id=5, eos_token_id=6, pad_token_id=None, name_or_path="t")
    assert h5.token_ids(no_pad) == TokenIds(bos=5, eos=6, pad=6)
    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=6, pad_token_id=1, name_or_path="t")
    with pytest.raises(ValueError, match="BOS or EOS"):
        h5.token_ids(no_bos)


def test_num_patches_of_demo_towers(demo_models: dict[str, str]) -> None:
    assert h5.num_patches_of(demo_models["vision"]) == (32 // 8) ** 2
    # A full VLM folder: the vision half of its config is used.
    assert h5.num_patches_of(demo_models["vlm"]) == (32 // 8) ** 2


# ---------------------------------------------------------------------------
# write_h5: the file layout
# ---------------------------------------------------------------------------


def test_write_h5_layout(tmp_path: Path) -> None:
    packed = [pack([0], 2, [], [7] * k, IDS, max_seq_len=8) for k in (1, 3)]
    examples = [e for e in packed if e is not None]
    assert len(examples) == 2
    path = tmp_path / "phase1" / "000000.h5"
    h5.write_h5(path, examples, ["000000/a.jpg", "000000/bb.jpg"], 8)
    assert [p.name for p in path.parent.iterdir()] == ["000000.h5"]  # atomic: no temp file
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.shape == (2, 4, 8)
        assert data.dtype == np.int32
        assert data.chunks == (1, 4, 8)
        assert data.compression == "gzip"
        assert (data[1] == examples[1].rows).all()
        img = f["img_path"]
        assert img.shape == (2, 1)
        assert img.dtype.kind == "S"
        assert img[0, 0] == b"000000/a.jpg"
        assert img[1, 0] == b"000000/bb.jpg"
        assert f.attrs["n_examples"] == 2


def test_write_h5_marks_a_text_only_sample_none(tmp_path: Path) -> None:
    example = pack([0], 2, [], [7], IDS, max_seq_len=8)
    assert example is not None
    path = tmp_path / "mixed.h5"
    h5.write_h5(path, [example, example], ["000000/a.jpg", None], 8)
    with h5py.File(path, "r") as f:
        assert f["img_path"][:, 0].tolist() == [b"000000/a.jpg", b"None"]


def test_write_h5_without_examples(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    h5.write_h5(path, [], [], 8)
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (0, 4, 8)
        assert f["img_path"].shape == (0, 1)
        assert f.attrs["n_examples"] == 0


# ---------------------------------------------------------------------------
# run_shard + build_index on a real shard
# ---------------------------------------------------------------------------

ATTRIBUTES = {
    "k000": ["dog", "red car"],
    "k003": ["cat"],
    "k004": ["green grass", "tree", "blue sky"],
}


def _write_parquets(folder: Path) -> tuple[Path, Path]:
    keys = [f"k{n:03d}" for n in range(5)]
    phase1 = [
        {
            "key": key,
            "web_caption": f"web {key}",
            "vlm_caption": f"a caption about {key}",
            "raw_answer": "",
            "attributes": ATTRIBUTES.get(key, []),
            "model": "llm",
            "prompt_id": "p",
            "failure": None if key in ATTRIBUTES else "no_items",
        }
        for key in keys
    ]
    # k001 failed upstream; k002 never reached phase 2 at all.
    phase2 = [
        {
            "key": key,
            "raw_answer": "",
            "phase1_attributes": ATTRIBUTES.get(key, []),
            "phase2_attributes": [],
            "attributes": ATTRIBUTES.get(key, []),
            "attribute_sources": ["phase1"] * len(ATTRIBUTES.get(key, [])),
            "model": "llm",
            "prompt_id": "p",
            "failure": None if key in ATTRIBUTES else "no_attributes",
        }
        for key in keys
        if key != "k002"
    ]
    write_rows_parquet(folder / "phase1.parquet", phase1, PHASE1_SCHEMA)
    write_rows_parquet(folder / "phase2.parquet", phase2, PHASE2_SCHEMA)
    return folder / "phase1.parquet", folder / "phase2.parquet"


def _run_shard(
    shard_tar: Path,
    root: Path,
    demo_models: dict[str, str],
    settings: H5Settings,
    vision_feature_layer: int | None = None,
) -> dict[str, Any]:
    phase1, phase2 = _write_parquets(root.parent)
    return h5.run_shard(
        shard_tar,
        phase1,
        phase2,
        demo_models["lm"],
        demo_models["vision"],
        settings,
        "000000",
        root / "phase1" / "000000.h5",
        root / "phase2" / "000000.h5",
        root / "images" / "000000",
        root / "params" / "000000.json",
        vision_feature_layer,
    )


def test_phase1_files_can_hold_the_frozen_vision_features(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str]
) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModel

    root = tmp_path / "h5"
    settings = H5Settings(max_seq_len=256, vision_features=True)
    params = _run_shard(shard_tar, root, demo_models, settings, vision_feature_layer=-2)
    assert params["vision_feature_layer"] == -2
    tower = AutoModel.from_pretrained(demo_models["vision"]).eval()
    processor = AutoImageProcessor.from_pretrained(demo_models["vision"])
    with h5py.File(root / "phase1" / "000000.h5", "r") as f:
        features = f["vision_features"]
        assert features.shape == (3, P, 32) and features.dtype == np.float16
        assert features.attrs["vision_feature_layer"] == -2
        first = features[0].astype(np.float32)
        image_path = root / "images" / f["img_path"][0][0].decode()
    # The tower's penultimate hidden state of that image, CLS dropped.
    pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    with torch.inference_mode():
        states = tower(pixels["pixel_values"], output_hidden_states=True).hidden_states
    assert np.allclose(first, states[-2][0, 1:].numpy(), atol=2e-2)
    with h5py.File(root / "phase2" / "000000.h5", "r") as f:
        assert "vision_features" not in f


def test_run_shard_and_build_index(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str], tokenizer: Any
) -> None:
    root = tmp_path / "h5"
    settings = H5Settings(max_seq_len=128, instruction=INSTRUCTION)
    params = _run_shard(shard_tar, root, demo_models, settings)

    kept = ["k000", "k003", "k004"]
    assert params["skipped"] == {"no_attributes": 1, "missing_attributes": 1}
    assert params["num_patches"] == P
    assert read_json(root / "params" / "000000.json") == params
    for name in ("phase1", "phase2"):
        assert params[name]["keys"] == kept
        assert params[name]["n_examples"] == 3
        assert params[name]["discarded_too_long"] == 0
    assert params["phase1"]["image_patch_start_idx"] == 1
    assert params["phase2"]["image_patch_start_idx"] == 1 + len(encode(tokenizer, phase2_prefix()))

    # Images are materialised under the image root, for the kept samples only.
    samples = {s.key: s for s in iter_samples(shard_tar)}
    image_root = root / "images"
    assert sorted(p.name for p in (image_root / "000000").iterdir()) == [f"{k}.jpg" for k in kept]

    h5.build_index(
        [root / "params" / "000000.json"], root / "metadata.json", root / "data_params.json"
    )
    metadata = read_json(root / "metadata.json")
    assert set(metadata) == set(kept)
    ids = h5.token_ids(tokenizer)
    for key, entry in metadata.items():
        assert entry["shard"] == "000000"
        for name in ("phase1", "phase2"):
            location = entry[name]
            assert location["file"] == f"{name}/000000.h5"
            with h5py.File(root / location["file"], "r") as f:
                relative = f["img_path"][location["row"], 0].decode()
                rows = f["data"][location["row"]]
            assert relative == f"000000/{key}.jpg"
            assert (image_root / relative).read_bytes() == samples[key].image_data
            if name == "phase1":
                expected = h5.phase1_example(tokenizer, ", ".join(ATTRIBUTES[key]), P, ids, 128)
            else:
                expected = h5.phase2_example(tokenizer, INSTRUCTION, ATTRIBUTES[key], P, ids, 128)
            assert expected is not None
            assert (rows == expected.rows).all()

    data_params = read_json(root / "data_params.json")
    assert data_params["skipped"] == {"no_attributes": 1, "missing_attributes": 1}
    assert data_params["shards"] == 1
    assert data_params["num_patches"] == P
    assert data_params["totals"]["phase1"]["n_examples"] == 3
    with h5py.File(root / "phase1" / "000000.h5", "r") as f:
        data = f["data"][:]
    assert data_params["totals"]["phase1"]["tokens"] == int((data[:, KEY_PADDING_MASK] == 0).sum())
    assert data_params["totals"]["phase1"]["loss_valid_tokens"] == int(data[:, LOSS_MASK].sum())
    assert data_params["image_patch_start_idx"] == {
        "phase1": 1,
        "phase2": params["phase2"]["image_patch_start_idx"],
    }


def test_run_shard_phase1_text_from_vlm_caption(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str], tokenizer: Any
) -> None:
    root = tmp_path / "h5"
    settings = H5Settings(max_seq_len=128, phase1_text="vlm_caption")
    _run_shard(shard_tar, root, demo_models, settings)
    with h5py.File(root / "phase1" / "000000.h5", "r") as f:
        rows = f["data"][0]
    assert tokenizer.decode(rows[LABELS][rows[LOSS_MASK] == 1][:-1]) == "a caption about k000"


def test_run_shard_counts_over_long_samples(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    # Room for the two shorter phase-2 answers but not for k004's three labels.
    monkeypatch.setattr(h5, "ANSWER_ROOM", 0)
    tokenizer = AutoTokenizer.from_pretrained(demo_models["lm"])
    ids = h5.token_ids(tokenizer)
    lengths = {
        key: int(
            (h5.phase2_example(tokenizer, INSTRUCTION, labels, P, ids, 512).rows[3] == 0).sum()
        )
        for key, labels in ATTRIBUTES.items()
    }
    assert lengths["k004"] > max(lengths["k000"], lengths["k003"])
    root = tmp_path / "h5"
    msl = lengths["k004"] - 1
    params = _run_shard(shard_tar, root, demo_models, H5Settings(max_seq_len=msl))
    assert params["phase1"]["n_examples"] == 3
    assert params["phase2"]["n_examples"] == 2
    assert params["phase2"]["discarded_too_long"] == 1
    assert params["phase2"]["keys"] == ["k000", "k003"]
    assert params["phase2"]["processed"] == params["phase1"]["processed"] == 3
    with h5py.File(root / "phase2" / "000000.h5", "r") as f:
        assert f["data"].shape == (2, 4, msl)
        assert f.attrs["n_examples"] == 2
    h5.build_index(
        [root / "params" / "000000.json"], root / "metadata.json", root / "data_params.json"
    )
    metadata = read_json(root / "metadata.json")
    assert "phase2" not in metadata["k004"] and "phase2" in metadata["k000"]
    data_params = read_json(root / "data_params.json")
    assert data_params["totals"]["phase2"]["discarded_too_long"] == 1


def test_a_max_seq_len_without_room_for_an_answer_is_refused(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str]
) -> None:
    root = tmp_path / "h5"
    # [BOS] + 16 patches + the vicuna system prompt + 16 answer tokens do not fit in 40.
    with pytest.raises(h5.AllDiscardedError) as error:
        _run_shard(shard_tar, root, demo_models, H5Settings(max_seq_len=40))
    message = str(error.value)
    assert message.startswith("config.h5.max_seq_len: 40 leaves no room for an answer")
    assert "16 image patches" in message
    minimum = int(message.split("The minimum is ")[1].split()[0])
    assert minimum > 40
    assert f"use at least {minimum}" in message
    assert not root.exists()  # refused before any file is written


def test_a_shard_whose_samples_are_all_too_long_fails_instead_of_writing_an_empty_file(
    shard_tar: Path, tmp_path: Path, demo_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h5, "ANSWER_ROOM", 0)
    root = tmp_path / "h5"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models["lm"])
    budget = h5.sequence_budget(tokenizer, P, H5Settings())
    # Room for the template and the end of the answer, none for a label.
    with pytest.raises(h5.AllDiscardedError, match=r"all 3 phase2 samples are longer than"):
        _run_shard(shard_tar, root, demo_models, H5Settings(max_seq_len=budget.minimum))
    assert not (root / "phase2" / "000000.h5").exists()
    assert not (root / "params" / "000000.json").exists()


def test_build_index_sums_shards(tmp_path: Path) -> None:
    from vlmflow.core.io import write_json

    def params(
        shard: str, keys: list[str], phase2_keys: list[str], skipped: dict[str, int]
    ) -> dict[str, Any]:
        def phase(ks: list[str], start: int | None) -> dict[str, Any]:
            return {
                "file": f"{shard}.h5",
                "keys": ks,
                "processed": len(ks) + 1,
                "n_examples": len(ks),
                "discarded_too_long": 1,
                "tokens": 10 * len(ks),
                "loss_valid_tokens": 3 * len(ks),
                "image_patch_start_idx": start if ks else None,
            }

        return {
            "shard": shard,
            "settings": {"max_seq_len": 64},
            "language_model": "lm",
            "vision_tower": "vt",
            "num_patches": 16,
            "bos_id": 0,
            "eos_id": 1,
            "pad_id": 2,
            "vocab_size": 512,
            "skipped": skipped,
            "phase1": phase(keys, 1),
            "phase2": phase(phase2_keys, 40),
        }

    write_json(tmp_path / "a.json", params("000000", ["a0", "a1"], [], {"no_attributes": 2}))
    write_json(
        tmp_path / "b.json",
        params("000001", ["b0"], ["b0"], {"no_attributes": 1, "caption_failed": 4}),
    )
    h5.build_index(
        [tmp_path / "a.json", tmp_path / "b.json"],
        tmp_path / "meta.json",
        tmp_path / "dp.json",
        out_phase_params={
            "phase1": tmp_path / "phase1" / "data_params.json",
            "phase2": tmp_path / "phase2" / "data_params.json",
        },
    )
    metadata = read_json(tmp_path / "meta.json")
    assert metadata == {
        "a0": {"shard": "000000", "phase1": {"file": "phase1/000000.h5", "row": 0}},
        "a1": {"shard": "000000", "phase1": {"file": "phase1/000000.h5", "row": 1}},
        "b0": {
            "shard": "000001",
            "phase1": {"file": "phase1/000001.h5", "row": 0},
            "phase2": {"file": "phase2/000001.h5", "row": 0},
        },
    }
    summary = read_json(tmp_path / "dp.json")
    assert summary["shards"] == 2
    assert summary["skipped"] == {"no_attributes": 3, "caption_failed": 4}
    assert summary["totals"]["phase1"] == {
        "processed": 5,
        "n_examples": 3,
        "discarded_too_long": 2,
        "tokens": 30,
        "loss_valid_tokens": 9,
    }
    assert summary["totals"]["phase2"]["n_examples"] == 1
    # The patch start comes from the first shard that has examples of that phase.
    assert summary["image_patch_start_idx"] == {"phase1": 1, "phase2": 40}
    assert summary["num_patches"] == 16
    assert summary["vocab_size"] == 512

    # Beside each phase's files, Cerebras' shape and key names.
    phase1 = read_json(tmp_path / "phase1" / "data_params.json")
    assert set(phase1) == {"setup", "processing", "dataset", "features", "post-process", "vlmflow"}
    assert phase1["features"] == ["input_ids", "loss_mask", "labels", "key_padding_mask"]
    assert phase1["processing"] == {
        "huggingface_tokenizer": "lm",
        "max_seq_length": 64,
        "bos_id": 0,
        "eos_id": 1,
        "pad_id": 2,
        "vocab_size": 512,
    }
    assert phase1["dataset"] == {
        "is_multimodal": True,
        "max_num_img": 1,
        "num_patches": 16,
        "image_start_idx": 1,
    }
    assert phase1["post-process"] == {
        "n_examples": 3,
        "num_tokens": 3 * 64,
        "loss_valid_tokens": 9,
        "num_masked_tokens": 3 * 64 - 9,
        "total_raw_docs": 5,
        "raw_docs_skipped": 2,
    }
    assert phase1["setup"] == {
        "output_dir": str(tmp_path / "phase1"),
        "image_dir": str(tmp_path / "images"),
    }
    assert phase1["vlmflow"]["files"] == ["000000.h5", "000001.h5"]
    phase2 = read_json(tmp_path / "phase2" / "data_params.json")
    assert phase2["post-process"]["n_examples"] == 1
    assert phase2["dataset"]["image_start_idx"] == 40


def test_build_index_refuses_an_unknown_phase(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown phase 'phase3'"):
        h5.build_index([], tmp_path / "m.json", tmp_path / "d.json", {"phase3": tmp_path / "x"})
