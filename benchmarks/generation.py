"""Batched vs one-at-a-time generation in the caption and attribute stages.

Runs the stages' own batch functions (vlmflow.stages.caption.caption_batch and
vlmflow.stages.attributes.answer_batch, left padding, prompts sorted by length as the stage
sorts them) on the tiny demo models (or the models given), once with batch size 1 (the
sequential baseline: one generate call per image or prompt, as a per-item loop does) and
once with the batch size asked for, greedy, the same inputs; the attribute stage also as
it runs (batched, every batch starting from the cache of the prompts' shared head, which
the stage computes once per shard; the script checks that this changes no answer).
Prints images or prompts per second and output tokens per second; then the attribute
stage in json mode (vlmflow.core.constrained: every answer constrained to a JSON list by
xgrammar) against free text on the same captions, both as the stage runs them and sampled
as the demo config samples: items/s, answer tokens/s, and decoded positions/s (every row's
decoding steps: the constraint's cost per token, whatever the answers' lengths), with the
grammar's own share of the time. The last lines are ``ratio batched/sequential: X.XX``
(items/s, both stages together, as the stages run vs one at a time) and ``ratio
json/text: X.XX`` (decoded positions/s).

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

from vlmflow.core import constrained
from vlmflow.core.attribute_text import phase1_prompt
from vlmflow.core.shards import iter_samples
from vlmflow.demo.demo_models import build_demo_llm, build_demo_vlm
from vlmflow.stages.attributes import (
    LLMSettings,
    answer_batch,
    chat_ids,
    length_order,
    load_llm,
    shared_prefix,
)
from vlmflow.stages.caption import CaptionSettings, caption_batch, load_vlm

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
        # Every row's decoding steps, also those after its answer ended (a batch decodes
        # until its longest answer ends).
        self.positions = 0
        model.generate = self

    def __call__(self, **kwargs: Any) -> Any:
        output = self.real(**kwargs)
        new = output[:, kwargs["input_ids"].shape[1] :]
        self.positions += new.numel()
        for row in new.tolist():
            ends = [i for i, token in enumerate(row) if token in self.stop]
            self.tokens += ends[0] + 1 if ends else len(row)
        return output


def timed(
    run: Callable[[list[int]], list[str]],
    order: list[int],
    batch_size: int,
    counter: GenerateCounter,
    on_start: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """Items/s and generated tokens/s over all items, in batches taken from ``order``."""
    run(order[:batch_size])  # warm-up (allocations, first-call costs)
    on_start()
    counter.tokens = counter.positions = 0
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
        formats, grammar_share = json_against_text(
            tokenizer, lm, llm_tokens, prompts, args.batch_size, GrammarTimer()
        )

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
    print(
        f"\nattribute stage, sampled (T 0.6, top-p 0.7), at most {JSON_TOKENS} new tokens,"
        f" best of {ROUNDS}"
    )
    print(f"{'format':<7} {'items/s':>8} {'tokens/s':>9} {'tokens/item':>11} {'positions/s':>11}")
    for name, (items, tokens, positions) in formats.items():
        print(f"{name:<7} {items:>8.1f} {tokens:>9.1f} {tokens / items:>11.1f} {positions:>11.1f}")
    print(f"grammar (matchers and masks): {100 * grammar_share:.1f} % of the json run's time")
    print(f"ratio batched/sequential: {sequential / staged:.2f}")
    # The constraint's cost per decoded token: answers of the two formats differ in length
    # (a random model's free text runs to max_new_tokens, its lists end earlier), and a
    # batch decodes until its longest answer ends, so answer tokens/s mixes that in.
    print(f"answer tokens/s json/text: {formats['json'][1] / formats['text'][1]:.2f}")
    print(f"ratio json/text: {formats['json'][2] / formats['text'][2]:.2f}")


class GrammarTimer:
    """Times the json mode's logits processor (xgrammar's matchers and masks) over the
    timed json run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = constrained.JsonListProcessor.__call__
        timer = self

        def timed(processor: Any, input_ids: Any, scores: Any) -> Any:
            started = time.perf_counter()
            try:
                return timer.real(processor, input_ids, scores)
            finally:
                timer.seconds += time.perf_counter() - started

        constrained.JsonListProcessor.__call__ = timed

    def reset(self) -> None:
        self.seconds = 0.0


# The demo config's phase-1 answer length, and json bounds whose longest list fits it.
JSON_TOKENS = 48
JSON_SHAPE = {"max_items": 4, "max_item_chars": 6}
# Runs of each format, taken in turns; the fastest counts (this machine's noise is large).
ROUNDS = 5


def json_against_text(
    tokenizer: Any,
    lm: Any,
    counter: GenerateCounter,
    prompts: list[str],
    batch_size: int,
    grammar: GrammarTimer,
) -> tuple[dict[str, tuple[float, float, float]], float]:
    """Items/s, answer tokens/s and decoded positions/s of the attribute stage's batches
    (shared-prefix cache, length order) in text and in json mode, each with its own
    prompt template, sampled; the best of ROUNDS runs taken in turns, and the grammar's
    share of that json run's time."""
    folder = Path(__file__).resolve().parents[1] / "config/prompts"
    runs = {}
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
        order = length_order(tokenizer, items)
        runs[name] = (stage_batches(tokenizer, lm, items, settings), order)
        if name == "json":
            # The same answers' cost through the other candidates (library choice).
            for other, make in OTHER_CONSTRAINTS.items():
                constraint = make(tokenizer, lm, settings)
                runs[other] = (stage_batches(tokenizer, lm, items, settings, constraint), order)
    run, order = runs["json"]
    if not all(isinstance(json.loads(answer), list) for answer in run(order[:batch_size])):
        raise SystemExit("a json-mode answer is not a JSON array")
    best: dict[str, tuple[float, float, float]] = {}
    share = 0.0
    for _ in range(ROUNDS):
        for name, (run, order) in runs.items():
            torch.manual_seed(0)
            items_per_s, tokens_per_s = timed(run, order, batch_size, counter, grammar.reset)
            positions_per_s = counter.positions * items_per_s / len(order)
            if name not in best or items_per_s > best[name][0]:
                best[name] = (items_per_s, tokens_per_s, positions_per_s)
                if name == "json":
                    share = grammar.seconds * items_per_s / len(order)
    return best, share


def stage_batches(
    tokenizer: Any, lm: Any, items: list[str], settings: LLMSettings, constraint: Any = None
) -> Callable[[list[int]], list[str]]:
    """The attribute stage's answer function for ``items``: the shared-prefix cache and,
    in json mode, the grammar (the stage's, unless ``constraint`` is given), both made
    once."""
    prefix = shared_prefix(lm, chat_ids(tokenizer, items))
    if constraint is None and settings.format == "json":
        constraint = xgrammar_constraint(tokenizer, lm, settings)

    def run(indices: list[int]) -> list[str]:
        batch = [items[i] for i in indices]
        return answer_batch(tokenizer, lm, batch, settings, prefix, constraint)

    return run


def xgrammar_constraint(tokenizer: Any, lm: Any, settings: LLMSettings) -> Any:
    """The stage's own constraint (vlmflow.core.constrained: xgrammar, batched matchers)."""
    shape = settings.list_shape("phase1")
    assert shape is not None
    return constrained.hf_constraint(tokenizer, lm, shape)


class ProcessorConstraint:
    """A constraint for answer_batch from a factory of logits processors."""

    def __init__(self, make: Callable[[], Any], stops: list[int]) -> None:
        self.make = make
        self.stops = stops

    def generate_kwargs(self) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList([self.make()]), "eos_token_id": self.stops}


def xgrammar_hf_constraint(tokenizer: Any, lm: Any, settings: LLMSettings) -> Any:
    """xgrammar's own transformers integration (xgrammar.contrib.hf), same grammar."""
    from xgrammar.contrib.hf import LogitsProcessor

    stage = xgrammar_constraint(tokenizer, lm, settings)
    return ProcessorConstraint(lambda: LogitsProcessor(stage.compiled), stage.stops)


class GuidanceProcessor:
    """llguidance (vLLM's `guidance` backend): one matcher per row, masks filled by its
    parallel executor."""

    def __init__(self, tokenizer: Any, grammar: str, vocab: int) -> None:
        import llguidance

        self.tokenizer, self.grammar, self.vocab = tokenizer, grammar, vocab
        self.executor = llguidance.LLExecutor()
        self.matchers: list[Any] = []
        self.mask: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import llguidance
        import llguidance.torch as guidance_torch

        if not self.matchers:
            rows = input_ids.shape[0]
            self.matchers = [
                llguidance.LLMatcher(self.tokenizer, self.grammar) for _ in range(rows)
            ]
            self.mask = guidance_torch.allocate_token_bitmask(rows, self.vocab)
        else:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist(), strict=True):
                if not matcher.is_stopped():
                    matcher.consume_token(token)
        # A stopped matcher's mask allows only its stop tokens.
        every = [(matcher, row) for row, matcher in enumerate(self.matchers)]
        guidance_torch.fill_next_token_bitmask_par(self.executor, every, self.mask)
        guidance_torch.apply_token_bitmask_inplace(scores, self.mask)
        return scores


def guidance_constraint(tokenizer: Any, lm: Any, settings: LLMSettings) -> Any:
    import llguidance
    import llguidance.hf

    shape = settings.list_shape("phase1")
    assert shape is not None
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    stops = constrained.stop_ids(tokenizer, lm.generation_config.eos_token_id)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stops)
    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(shape.schema(), overrides=compact)
    return ProcessorConstraint(lambda: GuidanceProcessor(ll_tokenizer, grammar, vocab), stops)


OTHER_CONSTRAINTS = {"xgr-hf": xgrammar_hf_constraint, "llguid": guidance_constraint}


if __name__ == "__main__":
    main()
