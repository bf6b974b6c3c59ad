"""Caption throughput by batch size, on the demo VLM (or any model given with --model).

Batched generation with left padding is what the caption stage does; batch size 1 is the
baseline (one image per generate call, as a naive per-image loop would do). Prints a table
of images/s and the speed-up over batch size 1, all measured in the same run.

    .venv/bin/python benchmarks/caption_batching.py [--model DIR] [--images 64]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

from vlmflow.caption import CaptionSettings, caption_batch, load_vlm
from vlmflow.models import build_demo_vlm
from vlmflow.shards import iter_samples


def make_shard(path: Path, count: int) -> None:
    with wds.TarWriter(str(path)) as writer:
        for number in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (64 + number % 7, 48), (number * 3 % 255, 80, 160)).save(
                buffer, format="JPEG"
            )
            writer.write(
                {
                    "__key__": f"k{number:05d}",
                    "jpg": buffer.getvalue(),
                    "txt": "a photo",
                    "json": json.dumps({"key": f"k{number:05d}"}),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="VLM folder or hub id (default: build the demo VLM)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(Path(tmp) / "vlm")
        if not args.model:
            build_demo_vlm(model, seed=0)
        make_shard(Path(tmp) / "shard.tar", args.images)
        samples = list(iter_samples(Path(tmp) / "shard.tar"))
        rows = []
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            settings = CaptionSettings(
                model=model,
                prompt="Describe the image.",
                max_new_tokens=24,
                do_sample=False,
                batch_size=batch_size,
            )
            processor, vlm = load_vlm(settings)
            caption_batch(processor, vlm, samples[:batch_size], settings)  # warm-up
            started = time.perf_counter()
            for start in range(0, len(samples), batch_size):
                caption_batch(processor, vlm, samples[start : start + batch_size], settings)
            rows.append((batch_size, len(samples) / (time.perf_counter() - started)))
    baseline = rows[0][1]
    print(f"{'batch size':>10}  {'images/s':>9}  {'vs batch 1':>10}")
    for batch_size, rate in rows:
        print(f"{batch_size:>10}  {rate:>9.1f}  {rate / baseline:>9.2f}x")


if __name__ == "__main__":
    main()
