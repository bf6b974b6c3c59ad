"""It learns: the two training phases on drawn shapes with known labels (vlmflow.demo.shapes)
make the tiny LLaVA name held-out images' colours and shapes far better than before."""

from __future__ import annotations

from pathlib import Path

from vlmflow.core.attribute_text import parse_list
from vlmflow.core.metrics import strict_prf
from vlmflow.core.shards import iter_samples
from vlmflow.demo import shapes
from vlmflow.stages import evaluate, h5, train

H5_SETTINGS = h5.H5Settings(max_seq_len=128)


def _pack(root: Path, name: str, items: list, demo_models: dict[str, str]) -> train.H5Source:
    shapes.write_shard(root / f"{name}.tar", items)
    shapes.write_attribute_tables(items, root / f"{name}-1.parquet", root / f"{name}-2.parquet")
    out = root / name
    params = h5.run_shard(
        root / f"{name}.tar",
        root / f"{name}-1.parquet",
        root / f"{name}-2.parquet",
        demo_models["lm"],
        demo_models["vision"],
        H5_SETTINGS,
        name,
        out / "phase1.h5",
        out / "phase2.h5",
        out / "images" / name,
        out / "params.json",
    )
    assert params["phase2"]["n_examples"] == len(items)
    return train.H5Source(out / "phase2.h5", out / "images")


def _strict_f1(model_dir: Path, tar: Path, references: list[list[str]]) -> tuple[float, list]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    settings = evaluate.EvalSettings(
        instruction=H5_SETTINGS.instruction, top_k=(2,), max_new_tokens=8, batch_size=8
    )
    answers = evaluate.predict(model, processor, list(iter_samples(tar)), settings)
    predictions = [parse_list(answer).attributes[:2] for answer in answers]
    return strict_prf(references, predictions).f1, answers


def test_training_on_labelled_shapes_beats_the_untrained_model(
    tmp_path: Path, demo_models: dict[str, str]
) -> None:
    train_items = shapes.samples(96, seed=1)
    held_out = shapes.samples(24, seed=2)  # other sizes and places
    source = _pack(tmp_path, "train", train_items, demo_models)
    _pack(tmp_path, "held", held_out, demo_models)
    phase1_source = train.H5Source(tmp_path / "train" / "phase1.h5", source.image_root)

    train.run(
        [phase1_source],
        tmp_path / "phase1",
        train.TrainSettings(phase=1, epochs=6, batch_size=8, lr=1e-2, seed=0),
        vision_tower=demo_models["vision"],
        language_model=demo_models["lm"],
    )
    history = train.run(
        [source],
        tmp_path / "phase2",
        train.TrainSettings(phase=2, epochs=10, batch_size=8, lr=3e-3, seed=0),
        init_from=str(tmp_path / "phase1"),
    )
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]

    references = [labels for _, _, labels in held_out]
    before, _ = _strict_f1(tmp_path / "phase1", tmp_path / "held.tar", references)
    after, answers = _strict_f1(tmp_path / "phase2", tmp_path / "held.tar", references)
    assert after >= 0.5, answers
    assert after >= before + 0.4, (before, after)
