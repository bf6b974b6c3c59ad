"""Batched vs one-at-a-time generation in the caption and attribute stages.

Runs the stages' own batch functions (vlmflow.caption.caption_batch and
vlmflow.attributes.answer_batch, left padding, prompts sorted by length as the stage
sorts them) on the tiny demo models (or the models given), once with batch size 1 (the
sequential baseline: one generate call per image or prompt, as a per-item loop does) and
once with the batch size asked for, greedy, the same inputs; the attribute stage also as
it runs (batched, every batch starting from the cache of the prompts' shared head, which
the stage computes once per shard; the script checks that this changes no answer).
Prints images or prompts per second and output tokens per second; then the attribute
stage in json mode (vlmflow.constrained: every answer constrained to a JSON list by
xgrammar) against free text on the same prompts, both as the stage runs them and sampled
as the demo config samples, in generated tokens per second. The last lines are ``ratio
batched/sequential: X.XX`` (items/s, both stages together, as the stages run vs one at a
time) and ``ratio json/text: X.XX`` (tokens/s).

    .venv/bin/python benchmarks/generation.py [--items 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from vlmflow import constrained
from vlmflow.attribute_text import phase1_prompt
from vlmflow.attributes import (
    LLMSettings,
    answer_batch,
    chat_ids,
    length_order,
    load_llm,
    shared_prefix,
)
from vlmflow.caption import CaptionSettings, caption_batch, load_vlm
from vlmflow.demo_models import build_demo_llm, build_demo_vlm
from vlmflow.shards import iter_samples

WORDS = ["red", "car", "tree", "dog", "cat", "sofa", "field", "river", "bench", "sky", "boat"]


def make_shard(path: Path, count: int) -> None:
    with wds.TarWriter(str(path)) as writer:
        for number in range(count):
            buffer = io.BytesIO()
            color = (number * 37 % 255, number * 91 % 255, 160)
            Image.new("RGB", (64 + number % 7, 48), color).save(buffer, format="JPEG")
            key = f"k{number:05d}"
            writer.write(
                {
                    "__key__": key,
                    "jpg": buffer.getvalue(),
                    "txt": "a photo",
                    "json": json.dumps({"key": key}),
                }
            )


def captions(count: int) -> list[tuple[str, str]]:
    """Web and VLM captions of varied length, as phase 1 gets them."""
    pairs = []
    for number in range(count):
        words = [WORDS[(number * 7 + i) % len(WORDS)] for i in range(3 + number % 9)]
        pairs.append((" ".join(words[:3]), "The image shows " + " and ".join(words) + "."))
    return pairs


class GenerateCounter:
    """Wraps ``model.generate`` to count the tokens it generates (up to each row's EOS)."""

    def __init__(self, model: Any) -> None:
        self.real = model.generate
        stop = model.generation_config.eos_token_id
        self.stop = set(stop if isinstance(stop, list) else [stop])
        self.tokens = 0
        model.generate = self

    def __call__(self, **kwargs: Any) -> Any:
        output = self.real(**kwargs)
        for row in output[:, kwargs["input_ids"].shape[1] :].tolist():
            ends = [i for i, token in enumerate(row) if token in self.stop]
            self.tokens += ends[0] + 1 if ends else len(row)
        return output


def timed(
    run: Callable[[list[int]], list[str]],
    order: list[int],
    batch_size: int,
    counter: GenerateCounter,
) -> tuple[float, float]:
    """Items/s and generated tokens/s over all items, in batches taken from ``order``."""
    run(order[:batch_size])  # warm-up (allocations, first-call costs)
    counter.tokens = 0
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        run(order[start : start + batch_size])
    seconds = time.perf_counter() - started
    return len(order) / seconds, counter.tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", help="VLM folder or hub id (default: build the demo VLM)")
    parser.add_argument("--llm", help="instruct LLM folder or hub id (default: the demo LLM)")
    parser.add_argument("--items", type=int, default=64, help="images and prompts per stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    prompt = (
        Path(__file__).resolve().parents[1] / "config/prompts/attributes_phase1.txt"
    ).read_text()
    results: dict[str, dict[int | str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vlm = args.vlm or str(Path(tmp) / "vlm")
        llm = args.llm or str(Path(tmp) / "llm")
        if not args.vlm:
            build_demo_vlm(vlm, seed=0)
        if not args.llm:
            build_demo_llm(llm, seed=0, delimiter_bias=1.5)  # the schema's default
        make_shard(Path(tmp) / "shard.tar", args.items)
        samples = list(iter_samples(Path(tmp) / "shard.tar"))

        caption_settings = CaptionSettings(
            model=vlm,
            prompt="Describe the image.",
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
        processor, model = load_vlm(caption_settings)
        vlm_tokens = GenerateCounter(model)

        def caption_items(indices: list[int]) -> list[str]:
            batch = [samples[i] for i in indices]
            return caption_batch(processor, model, batch, caption_settings)

        results["caption"] = {
            size: timed(caption_items, list(range(len(samples))), size, vlm_tokens)
            for size in (1, args.batch_size)
        }

        llm_settings = LLMSettings(
            model=llm, prompt=prompt, max_new_tokens=args.max_new_tokens, do_sample=False
        )
        tokenizer, lm = load_llm(llm_settings)
        llm_tokens = GenerateCounter(lm)
        prompts = [phase1_prompt(prompt, web, text) for web, text in captions(args.items)]

        def answer_items(indices: list[int]) -> list[str]:
            return answer_batch(tokenizer, lm, [prompts[i] for i in indices], llm_settings)

        # The stage also computes the prompts' shared head (chat header and instructions)
        # once and starts every batch from a copy of its cache.
        prefix = shared_prefix(lm, chat_ids(tokenizer, prompts))

        def answer_items_after_prefix(indices: list[int]) -> list[str]:
            batch = [prompts[i] for i in indices]
            return answer_batch(tokenizer, lm, batch, llm_settings, prefix=prefix)

        order = length_order(tokenizer, prompts)  # as the stage batches them
        results["attributes"] = {
            size: timed(answer_items, order, size, llm_tokens) for size in (1, args.batch_size)
        }
        results["attributes"]["stage"] = timed(
            answer_items_after_prefix, order, args.batch_size, llm_tokens
        )
        same = [answer_items(order[i : i + 8]) for i in range(0, 16, 8)]
        again = [answer_items_after_prefix(order[i : i + 8]) for i in range(0, 16, 8)]
        if same != again:
            raise SystemExit("the shared-prefix cache changed an answer")
        formats = json_against_text(tokenizer, lm, llm_tokens, prompts, args.batch_size)

    print(
        f"\n{args.items} items per stage, greedy, at most {args.max_new_tokens} new tokens,"
        f" {torch.get_num_threads()} CPU threads; shared prompt prefix:"
        f" {len(prefix.ids) if prefix else 0} tokens\n"
    )
    print(f"{'stage':<11} {'batch':>14} {'items/s':>8} {'tokens/s':>9} {'vs batch 1':>10}")
    for stage, by_size in results.items():
        base = by_size[1][0]
        for size, (items, tokens) in by_size.items():
            label = f"{args.batch_size} + prefix" if size == "stage" else str(size)
            print(f"{stage:<11} {label:>14} {items:>8.1f} {tokens:>9.1f} {items / base:>9.2f}x")
    # Both stages together: total time for all items, one at a time vs as the stages run
    # (batched; the attribute stage also with its shared-prefix cache).
    sequential = sum(args.items / by_size[1][0] for by_size in results.values())
    staged = sum(
        args.items / by_size.get("stage", by_size[args.batch_size])[0]
        for by_size in results.values()
    )
    batched = sum(args.items / by_size[args.batch_size][0] for by_size in results.values())
    print(f"batched without the prefix cache: {sequential / batched:.2f}x")
    print(f"\nattribute stage, sampled (T 0.6, top-p 0.7), at most {JSON_TOKENS} new tokens")
    print(f"{'format':<7} {'items/s':>8} {'tokens/s':>9} {'tokens/item':>11}")
    for name, (items, tokens) in formats.items():
        print(f"{name:<7} {items:>8.1f} {tokens:>9.1f} {tokens / items:>11.1f}")
    print(f"ratio batched/sequential: {sequential / staged:.2f}")
    print(f"ratio json/text: {formats['json'][1] / formats['text'][1]:.2f}")


# The demo config's phase-1 answer length, and json bounds whose longest list fits it.
JSON_TOKENS = 48
JSON_SHAPE = {"max_items": 4, "max_item_chars": 6}


def json_against_text(
    tokenizer: Any, lm: Any, counter: GenerateCounter, prompts: list[str], batch_size: int
) -> dict[str, tuple[float, float]]:
    """Items/s and tokens/s of the attribute stage's batches (shared-prefix cache, length
    order) in text and in json mode, each with its own prompt template, sampled."""
    folder = Path(__file__).resolve().parents[1] / "config/prompts"
    results = {}
    for name in constrained.FORMATS:
        suffix = "_json" if name == "json" else ""
        template = (folder / f"attributes_phase1{suffix}.txt").read_text()
        settings = LLMSettings(
            model="demo",
            prompt=template,
            max_new_tokens=JSON_TOKENS,
            temperature=0.6,
            top_p=0.7,
            format=name,
            **JSON_SHAPE,
        )
        items = [phase1_prompt(template, *pair) for pair in captions(len(prompts))]
        run = stage_batches(tokenizer, lm, items, settings)
        order = length_order(tokenizer, items)
        torch.manual_seed(0)
        results[name] = timed(run, order, batch_size, counter)
        if name == "json" and not all(
            isinstance(json.loads(answer), list) for answer in run(order[:batch_size])
        ):
            raise SystemExit("a json-mode answer is not a JSON array")
    return results


def stage_batches(
    tokenizer: Any, lm: Any, items: list[str], settings: LLMSettings
) -> Callable[[list[int]], list[str]]:
    """The attribute stage's answer function for ``items``: the shared-prefix cache and,
    in json mode, the grammar, both made once."""
    prefix = shared_prefix(lm, chat_ids(tokenizer, items))
    shape = settings.list_shape("phase1")
    constraint = None
    if shape is not None:
        vocab = int(lm.get_output_embeddings().weight.shape[0])
        eos = lm.generation_config.eos_token_id
        constraint = constrained.hf_constraint(tokenizer, vocab, eos, shape)

    def run(indices: list[int]) -> list[str]:
        batch = [items[i] for i in indices]
        return answer_batch(tokenizer, lm, batch, settings, prefix, constraint)

    return run


if __name__ == "__main__":
    main()
