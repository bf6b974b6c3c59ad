"""HF backend vs vLLM backend on the caption and attribute stages' own code.

Runs vlmflow.stages.caption.run and vlmflow.stages.attributes.run_phase1 as the workflow's jobs run
them, once per backend, on the same inputs: a shard of drawn images and the phase-1
prompts of its captions, greedy, the same maximum of new tokens. The models are the
miniatures of LLaVA-1.5 (llava-hf) and Llama-3-8B-Instruct (vlmflow.demo.miniatures: real
shapes and conventions, widths and depths shrunk; vLLM's CPU attention needs their head
dimension of 32); the attribute stage's Llama is built without the miniature's list bias,
so that its greedy answers are text; it also runs in json mode (vlmflow.core.constrained:
answers constrained to a JSON list, xgrammar on both backends). Start-up and shutdown are
timed inside each run and taken out of the steady state: loading the HF model; for vLLM,
from the engine's start until it is ready (the job makes its prompts meanwhile) and its
stop at the end, as the offline floor's start-up is.
The vLLM backend keeps a window of requests in its engine (vlmflow.core.engine.in_window); the
floor it is measured against is the same phase-1 prompts (the same token ids) through
vLLM's offline ``LLM.generate`` in the engine's environment (benchmarks/vllm_offline.py),
with the same engine settings and environment.
Prints items/s, output tokens/s, start-up and shutdown seconds per stage and backend (and
offline), how many outputs are equal, each backend's json/text ratio of the attribute
stage's tokens/s, ``ratio server/offline: X.XX`` (the attribute stage's tokens/s on the
vllm backend, the job's own work included, against the offline floor) and last ``ratio
vllm/hf: X.XX`` (output tokens/s in steady state, caption and free-text attribute stages
together).

    .venv/bin/python benchmarks/engines.py [--items 64] [--new-tokens 32]
    .venv/bin/python benchmarks/engines.py --gpu   # an 8B-shaped random Llama, bf16

``--gpu`` (a machine with an NVIDIA GPU) measures the attribute stage on a random Llama
with Llama-3-8B's configuration in bf16 instead of the miniatures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlmflow.core import engine, engine_process
from vlmflow.core.attribute_text import clean_vlm_caption, phase1_prompt
from vlmflow.core.io import write_rows_parquet
from vlmflow.core.prompts import read_prompt
from vlmflow.demo import miniatures
from vlmflow.demo.shapes import samples, write_shard
from vlmflow.stages import attributes, caption
from vlmflow.stages.attributes import generation
from vlmflow.stages.caption import CAPTION_SCHEMA, CaptionSettings

REPO = Path(__file__).resolve().parent.parent
PIN = "be" * 20
VLM = f"llava-hf/llava-1.5-7b-hf@{PIN}"
LLM = f"meta-llama/Meta-Llama-3-8B-Instruct@{PIN}"
PHASE1 = read_prompt(REPO / "config" / "prompts" / "attributes_phase1.txt")
PHASE1_JSON = read_prompt(REPO / "config" / "prompts" / "attributes_phase1_json.txt")
# json mode: bounds whose longest list 42 new tokens hold (vlmflow.checks).
JSON_MODE = {"prompt": PHASE1_JSON, "format": "json", "max_items": 4, "max_item_chars": 6}


@dataclass
class Measure:
    stage: str
    backend: str
    items: int
    startup_s: float
    steady_s: float
    tokens: int
    outputs: list[str]
    stop_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.steady_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.steady_s


def make_shard(path: Path, count: int) -> None:
    """``count`` drawn shapes of 256 px (vlmflow.demo.shapes), as an ingest shard."""
    write_shard(path, samples(count, seed=0, size=256))


def token_count(model: str, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    from vlmflow.core.models import pretrained

    tokenizer = AutoTokenizer.from_pretrained(**pretrained(model))
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


class StartUp:
    """Times the start-up inside a stage's run: loading the HF model, or starting the vLLM
    server until it answers (the stages' own functions, wrapped here for the benchmark)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, timed)


STARTUP = StartUp()
STARTUP.wrap(caption, "load_vlm")
STARTUP.wrap(generation, "load_llm")
ENGINE_READY = engine_process.Engine.wait_ready


def engine_start_up(self: engine_process.Engine) -> None:
    """The vLLM engine's start-up: from its start until it is ready (the job prepares its
    requests meanwhile, hidden in it)."""
    ENGINE_READY(self)
    STARTUP.seconds += time.monotonic() - self.started


setattr(engine_process.Engine, "wait_ready", engine_start_up)  # noqa: B010 - the benchmark's wrapper
# Stopping the server at the end of a job (vLLM's shutdown): a fixed cost as the start-up.
SHUTDOWN = StartUp()
SHUTDOWN.wrap(engine_process.Engine, "stop")


def measure(stage: str, backend: str, items: int, model: str, out: Path, run: Any) -> Measure:
    STARTUP.seconds = SHUTDOWN.seconds = 0.0
    started = time.perf_counter()
    run()
    total = time.perf_counter() - started
    column = "vlm_caption" if stage == "caption" else "raw_answer"
    texts = [row[column] or "" for row in pq.read_table(out).to_pylist()]
    steady = total - STARTUP.seconds - SHUTDOWN.seconds
    tokens = token_count(model, texts)
    return Measure(stage, backend, items, STARTUP.seconds, steady, tokens, texts, SHUTDOWN.seconds)


def caption_stage(
    settings: CaptionSettings, work: Path, items: int, deployment: engine.Deployment
) -> Measure:
    work.mkdir(parents=True, exist_ok=True)
    shard, out = work / "shard.tar", work / "captions.parquet"
    make_shard(shard, items)
    return measure(
        "caption",
        settings.backend,
        items,
        settings.model,
        out,
        lambda: caption.run(shard, out, settings, "0", deployment),
    )


def caption_rows(items: int) -> list[dict[str, Any]]:
    """Phase 1's input: web and VLM captions of varied words."""
    words = ["red", "car", "tree", "dog", "cat", "sofa", "field", "river", "bench", "sky"]
    return [
        {
            "key": f"k{n:05d}",
            "web_caption": " ".join(words[(n + i) % len(words)] for i in range(4)),
            "vlm_caption": " ".join(words[(3 * n + i) % len(words)] for i in range(12)),
            "failure": None,
            "model": "vlm",
            "engine": None,
            "prompt_id": "p",
            "settings": "{}",
        }
        for n in range(items)
    ]


def attribute_stage(
    settings: attributes.LLMSettings, work: Path, items: int, deployment: engine.Deployment
) -> Measure:
    work.mkdir(parents=True, exist_ok=True)
    captions, out = work / "captions.parquet", work / "phase1.parquet"
    write_rows_parquet(captions, caption_rows(items), CAPTION_SCHEMA)
    return measure(
        "attributes" if settings.format == "text" else "attr-json",
        settings.backend,
        items,
        settings.model,
        out,
        lambda: attributes.run_phase1(captions, out, settings, "0", deployment),
    )


def offline_floor(settings: attributes.LLMSettings, work: Path, items: int, python: str) -> Measure:
    """The phase-1 prompts of ``attribute_stage`` (the same token ids) through vLLM's
    offline ``LLM.generate`` in the engine's environment (benchmarks/vllm_offline.py),
    with the server's engine settings; start-up timed apart."""
    tokenizer = attributes.load_tokenizer(settings)
    prompts = [
        phase1_prompt(settings.prompt, row["web_caption"], clean_vlm_caption(row["vlm_caption"]))
        for row in caption_rows(items)
    ]
    stops, bias = engine.generation_defaults(settings.model)
    options = engine.EngineSettings(**settings.engine)
    spec = {
        "model": settings.model,
        "dtype": settings.dtype,
        "max_model_len": options.max_model_len,
        "max_num_seqs": engine.window_of(options),
        "seed": settings.seed,
        "prompts": attributes.chat_ids(tokenizer, prompts),
        "max_tokens": settings.max_new_tokens,
        "stop_token_ids": list(stops),
        "logit_bias": bias,
        # As the server runs on a CPU (vlmflow.core.engine.server_command).
        "chunked_prefill": engine.visible_gpus() > 0,
        "enforce_eager": engine.visible_gpus() == 0,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    script = str(REPO / "benchmarks" / "vllm_offline.py")
    log = work / "offline.log"
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(
            [python, script, str(work / "spec.json"), str(work / "out.json")],
            env=engine.engine_environment(None, engine.visible_gpus()),  # as the backend's
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode:
        raise SystemExit(f"vLLM's offline run failed (log: {log}): {engine_process.last_line(log)}")
    result = json.loads((work / "out.json").read_text(encoding="utf-8"))
    texts = [
        str(tokenizer.decode(ids, skip_special_tokens=True)).strip() for ids in result["answers"]
    ]
    tokens = token_count(settings.model, texts)
    return Measure(
        "attributes", "offline", items, result["startup_s"], result["seconds"], tokens, texts
    )


def build_8b(folder: Path) -> str:
    """A random Llama with Llama-3-8B's configuration, bf16, and the Llama-3 miniature's
    tokenizer padded to Llama 3's vocabulary size (--gpu)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = miniatures.snapshot_dir(os.environ["HF_HUB_CACHE"], *LLM.split("@"))
    tokenizer = AutoTokenizer.from_pretrained(small)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def table(measures: list[Measure]) -> list[str]:
    lines = [
        f"{'stage':<11}{'backend':<8}{'items':>6}{'start s':>9}{'stop s':>8}{'items/s':>9}"
        f"{'tokens/s':>10}"
    ]
    for m in measures:
        lines.append(
            f"{m.stage:<11}{m.backend:<8}{m.items:>6}{m.startup_s:>9.1f}{m.stop_s:>8.1f}"
            f"{m.items_per_s:>9.1f}{m.tokens_per_s:>10.1f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpu", action="store_true", help="an 8B-shaped Llama in bf16")
    parser.add_argument(
        "--vllm-command",
        default=str(REPO / ".venv-vllm" / "bin" / "python"),
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="engines-"))
    os.environ.setdefault("HF_HUB_CACHE", str(work / "hub"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_CACHE = os.environ["HF_HUB_CACHE"]
    for reference in (VLM, LLM):
        miniatures.install(reference, os.environ["HF_HUB_CACHE"])
    deployment = engine.Deployment(args.vllm_command, str(work / "vllm.log"))
    dtype = "bfloat16" if args.gpu else "float32"
    common = {"max_new_tokens": args.new_tokens, "do_sample": False, "batch_size": args.batch_size}
    engine_settings = {"max_model_len": 4096}
    measures: list[Measure] = []
    if not args.gpu:
        vlm = CaptionSettings(model=VLM, prompt="Describe the image.", dtype=dtype, **common)
        for backend in ("hf", "vllm"):
            options = replace(
                vlm, backend=backend, engine=engine_settings if backend == "vllm" else {}
            )
            measures.append(caption_stage(options, work / f"c-{backend}", args.items, deployment))
    # Llama-3's miniature without its list bias, whose greedy answers are text, not commas.
    llm = build_8b(work / "llama-8b") if args.gpu else str(work / "llama3")
    if not args.gpu:
        miniatures.build_llama3_instruct(work / "llama3", seed=1, list_bias=0.0)
    phase1 = attributes.LLMSettings(model=llm, prompt=PHASE1, dtype=dtype, **common)
    for backend in ("hf", "vllm"):
        options = replace(
            phase1, backend=backend, engine=engine_settings if backend == "vllm" else {}
        )
        measures.append(attribute_stage(options, work / f"a-{backend}", args.items, deployment))
        json_mode = replace(options, max_new_tokens=max(args.new_tokens, 42), **JSON_MODE)
        measures.append(attribute_stage(json_mode, work / f"j-{backend}", args.items, deployment))
    served = replace(phase1, backend="vllm", engine=engine_settings)
    python = shlex.split(args.vllm_command)[0]
    floor = offline_floor(served, work / "offline", args.items, python)
    print("\n".join(table([*measures, floor])))
    by = {(m.stage, m.backend): m for m in [*measures, floor]}
    for stage, other in [(m.stage, m.backend) for m in [*measures, floor] if m.backend != "hf"]:
        hf, them = by[stage, "hf" if other == "vllm" else "vllm"], by[stage, other]
        same = sum(a == b for a, b in zip(hf.outputs, them.outputs, strict=True))
        against = "hf" if other == "vllm" else "the vllm backend"
        print(f"{stage} {other}: {same} of {len(hf.outputs)} greedy outputs equal {against}'s")
    for backend in ("hf", "vllm"):
        ratio = by["attr-json", backend].tokens_per_s / by["attributes", backend].tokens_per_s
        print(f"{backend} json/text: {ratio:.2f}")
    free = [m for m in measures if m.stage != "attr-json"]
    tokens = {b: sum(m.tokens for m in free if m.backend == b) for b in ("hf", "vllm")}
    seconds = {b: sum(m.steady_s for m in free if m.backend == b) for b in ("hf", "vllm")}
    server = by["attributes", "vllm"].tokens_per_s
    print(f"ratio server/offline: {server / floor.tokens_per_s:.2f}")
    print(
        f"ratio vllm/hf: {(tokens['vllm'] / seconds['vllm']) / (tokens['hf'] / seconds['hf']):.2f}"
    )


if __name__ == "__main__":
    main()
