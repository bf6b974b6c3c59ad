"""Can the H5 training loader feed the training step?

Builds a shard of drawn shapes (vlmflow.demo.shapes, JPEG, ``--image-size`` px), packs it with
the h5 stage (vlmflow.stages.h5.run_shard, phase-2 layout) and measures, in one run:

- the training loader: vlmflow.stages.train.H5Examples through torchdata's StatefulDataLoader as
  the train stage builds it (rows read from the HDF5 file, image decoded and transformed
  by the vision tower's image processor), samples/s;
- the same samples read from the WebDataset shard instead (decode, transform, tokenise
  and pack with the h5 stage's own function), samples/s;
- the training step's consumption: forward, backward and AdamW step of phase 2 (projector
  + language model) on the tiny demo LLaVA, samples/s.

The last line is ``ratio loader/step: X.XX`` (loader samples/s over step samples/s).

    .venv/bin/python benchmarks/h5_loader.py [--samples 512] [--batch-size 8] [--workers 0]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmflow.demo import shapes
from vlmflow.demo.demo_models import build_demo_language_model, build_demo_vision_tower
from vlmflow.stages import h5, train


def timed(make_iterable: Any, count_of: Any, repeats: int) -> float:
    """Items per second: the median of ``repeats`` full passes over a fresh iterable (each
    after one warm-up item). One pass of a few hundred samples lasts a fraction of a
    second, so a single pass swings with whatever else the machine does."""
    rates = []
    for _ in range(repeats):
        iterator = iter(make_iterable())
        count_of(next(iterator))
        started = time.perf_counter()
        counted = 0
        for item in iterator:
            counted += count_of(item)
        rates.append(counted / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    parser.add_argument("--repeats", type=int, default=5, help="passes per path (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_demo_vision_tower(root / "vision", seed=0)
        build_demo_language_model(root / "lm", seed=0)
        items = shapes.samples(args.samples, seed=0, size=args.image_size)
        shapes.write_shard(root / "000000.tar", items)
        shapes.write_attribute_tables(items, root / "p1.parquet", root / "p2.parquet")
        settings = h5.H5Settings(max_seq_len=128)
        h5.run_shard(
            root / "000000.tar",
            root / "p1.parquet",
            root / "p2.parquet",
            str(root / "lm"),
            str(root / "vision"),
            settings,
            "000000",
            root / "h5" / "phase1" / "000000.h5",
            root / "h5" / "phase2" / "000000.h5",
            root / "h5" / "images" / "000000",
            root / "h5" / "params.json",
        )
        source = train.H5Source(root / "h5" / "phase2" / "000000.h5", root / "h5" / "images")
        model, processor = train.build_llava(
            str(root / "vision"), str(root / "lm"), train.TrainSettings(phase=2)
        )

        # The train stage's loader.
        dataset = train.H5Examples([source], processor.image_processor)
        loader = StatefulDataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers
        )
        loader_rate = timed(lambda: loader, lambda batch: len(batch["rows"]), args.repeats)

        # The same samples from the WebDataset shard: decode, transform, tokenise, pack.
        tokenizer = processor.tokenizer
        ids = h5.token_ids(tokenizer)
        labels_of = {key: labels for key, _, labels in items}
        num_patches = h5.num_patches_of(str(root / "vision"))

        def from_tar() -> Any:
            for sample in wds.WebDataset(str(root / "000000.tar"), shardshuffle=False).decode(
                "pil"
            ):
                pixels = processor.image_processor(images=sample["jpg"], return_tensors="pt")
                example = h5.phase2_example(
                    tokenizer,
                    settings.instruction,
                    labels_of[sample["__key__"]],
                    num_patches,
                    ids,
                    settings.max_seq_len,
                )
                yield pixels, example

        tar_rate = timed(from_tar, lambda _: 1, args.repeats)

        # The training step, fed from memory so only the step is timed.
        trainable = train.set_trainable(model, train.TrainSettings(phase=2))
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        batches = [batch for _, batch in zip(range(args.steps + 1), loader, strict=False)]
        pad_id = ids.pad
        image_token = model.config.image_token_index
        model.train()

        def steps() -> Any:
            for batch in batches:
                inputs = train.model_inputs(batch["rows"], pad_id, image_token, num_patches)
                logits = model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    pixel_values=batch["pixel_values"],
                ).logits
                loss = train.masked_loss(logits, inputs["labels"], inputs["loss_mask"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                yield len(batch["rows"])

        step_rate = timed(steps, lambda n: n, args.repeats)

    print(
        f"\n{args.samples} samples, {args.image_size} px JPEG, batch {args.batch_size}, "
        f"{args.workers} loader workers, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats} passes\n"
    )
    print(f"{'path':<44} {'samples/s':>10}")
    print(f"{'H5 loader (HDF5 rows + image decode/transform)':<44} {loader_rate:>10.1f}")
    print(f"{'WebDataset shard (decode/transform/tokenise)':<44} {tar_rate:>10.1f}")
    print(f"{'training step (phase 2, tiny LLaVA)':<44} {step_rate:>10.1f}")
    print(f"loader vs WebDataset: {loader_rate / tar_rate:.2f}x")
    print(f"ratio loader/step: {loader_rate / step_rate:.2f}")


if __name__ == "__main__":
    main()
