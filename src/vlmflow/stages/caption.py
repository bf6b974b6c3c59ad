"""Caption stage: a vision-language model describes every image of a shard.

Two routes, picked from the model's config.json (``vlm_route``):

- ``image_text_to_text``: any transformers image-text-to-text model loads through
  ``AutoProcessor`` and ``AutoModelForImageTextToText``; the prompt goes through the
  processor's chat template.
- ``internvl_chat``: the InternVL chat-model family (InternVL-Chat-V1.5, InternVL2,
  InternVL2.5; ``InternVLChatModel``) loads its own remote code through ``AutoModel``
  and ``AutoTokenizer`` (only with ``trust_remote_code``) and captions through the
  model's ``batch_chat`` (see vlmflow.families.internvl_chat).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from vlmflow.core import engine
from vlmflow.core.errors import ConfigError
from vlmflow.core.io import stable_seed, write_rows_parquet
from vlmflow.core.models import GenerationSettings, hf_engine, is_hub_id, pretrained, split_revision
from vlmflow.core.progress import (
    ProgressFile,
    fingerprint,
    input_state,
    progress_path,
    run_batches,
    run_stream,
)
from vlmflow.core.prompts import prompt_id
from vlmflow.core.shards import Sample, iter_samples
from vlmflow.families import internvl_chat

log = logging.getLogger(__name__)

CAPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("web_caption", pa.string()),
        ("vlm_caption", pa.string()),
        ("model", pa.string()),
        # The backend that wrote the caption and its version ("transformers 5.23.0",
        # "vllm 0.32.0"); None for a failed sample.
        ("engine", pa.string()),
        ("prompt_id", pa.string()),
        ("settings", pa.string()),
        ("failure", pa.string()),
    ]
)


@dataclass(frozen=True)
class CaptionSettings(GenerationSettings):
    """Model, prompt and sampling settings of the caption stage."""

    # InternVL-Chat-V1.5's captioning settings as ROVI ran them.
    max_new_tokens: int = 168
    batch_size: int = 6
    # Tile budget for processors that cut images into tiles (InternVL's dynamic
    # resolution: up to max_tiles tiles plus a thumbnail); None keeps the model's own
    # (the InternVL chat route: the model cards' 12).
    max_tiles: int | None = None
    # Pixel budget per image for processors that read images at their own size
    # (Qwen2-VL: one token per 28x28 pixels); None keeps the model's own.
    min_pixels: int | None = None
    max_pixels: int | None = None


IMAGE_TEXT_TO_TEXT = "image_text_to_text"
INTERNVL_CHAT = "internvl_chat"


def vlm_route(reference: str, trust_remote_code: bool, backend: str = "hf") -> str | None:
    """How ``reference`` (a folder, ``org/name`` or ``org/name@rev``) captions:
    ``"internvl_chat"`` or ``"image_text_to_text"``, read from its config.json without
    loading weights.

    None when config.json is not on this machine (a hub model not downloaded yet): the
    route is then decided when the caption job loads the model. Raises ValueError for a
    model neither route can load, or an InternVL chat model without trust_remote_code.
    On ``backend`` vllm the InternVL chat family runs on vLLM's own implementation of it,
    whatever its language model: transformers 5 never runs its modelling code there.
    """
    config = internvl_chat.read_config(reference)
    if config is None:
        return None
    return route_of_config(config, reference, trust_remote_code, backend)


def route_of_config(
    config: dict[str, Any], reference: str, trust_remote_code: bool, backend: str = "hf"
) -> str:
    """The route of a config.json dict (see ``vlm_route``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if internvl_chat.is_internvl_chat(config):
        if not trust_remote_code:
            raise ValueError(internvl_chat.remote_code_refusal(reference))
        blocker = (
            None if backend == "vllm" else internvl_chat.remote_code_blocker(reference, config)
        )
        if blocker is not None:
            raise ValueError(blocker)
        return INTERNVL_CHAT
    architectures = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    known = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or known & set(architectures):
        return IMAGE_TEXT_TO_TEXT
    if "AutoModelForImageTextToText" in (config.get("auto_map") or {}):
        # An image-text-to-text model with its own code: loads on the same route.
        if not trust_remote_code:
            raise ValueError(
                f"models.vlm {reference!r} ({', '.join(architectures) or model_type}) runs its "
                "own Python code from the model repository; set models.trust_remote_code: "
                "true to allow that"
            )
        return IMAGE_TEXT_TO_TEXT
    found = ", ".join(architectures) or f"model_type {model_type!r}"
    raise ValueError(
        f"models.vlm {reference!r} is a {found}, which the caption stage cannot load: "
        "it takes transformers image-text-to-text models (AutoModelForImageTextToText: "
        "LLaVA, InternVL -hf conversions, Qwen2-VL, ...) and the InternVL chat family "
        f"({internvl_chat.ARCHITECTURE}: InternVL-Chat-V1.5, InternVL2, InternVL2.5, with "
        "models.trust_remote_code: true); point models.vlm at one of those"
    )


def resolve_route(settings: CaptionSettings) -> str:
    """``vlm_route`` for a caption job: a hub model's config.json is downloaded (into the
    hub cache) when it is not on this machine yet."""
    route = vlm_route(settings.model, settings.trust_remote_code, settings.backend)
    if route is not None:
        return route
    if not is_hub_id(settings.model):
        raise ValueError(f"models.vlm {settings.model!r}: no config.json there")
    from huggingface_hub import hf_hub_download

    name, revision = split_revision(settings.model)
    path = hf_hub_download(name, "config.json", revision=revision)
    return route_of_config(
        json.loads(Path(path).read_text()),
        settings.model,
        settings.trust_remote_code,
        settings.backend,
    )


def load_vlm(settings: CaptionSettings) -> tuple[Any, Any]:
    """(processor, model) on the image-text-to-text route, (tokenizer, model) on the
    InternVL chat route."""
    if resolve_route(settings) == INTERNVL_CHAT:
        return internvl_chat.load(settings)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(
        **pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
    )
    model = settings.load_pretrained(AutoModelForImageTextToText)
    # Batched generation with a decoder-only LM needs the padding on the left.
    processor.tokenizer.padding_side = "left"
    return processor, model


def caption_batch(
    processor: Any, model: Any, samples: list[Sample], settings: CaptionSettings
) -> list[str]:
    if internvl_chat.is_chat_model(model):
        return internvl_chat.caption_batch(processor, model, samples, settings)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(
        images=[sample.image() for sample in samples],
        text=[text] * len(samples),
        padding=True,
        return_tensors="pt",
        **processor_kwargs(processor, settings),
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings.generation_kwargs())
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def processor_kwargs(processor: Any, settings: CaptionSettings) -> dict[str, Any]:
    """The processor call's image budget: tiles for processors that tile (InternVL),
    pixels for those that read images at their own size (Qwen2-VL's ``size``, in pixels)."""
    kwargs: dict[str, Any] = {}
    image_processor = processor.image_processor
    name = type(image_processor).__name__
    if settings.max_tiles is not None:
        if not getattr(image_processor, "crop_to_patches", False):
            raise ValueError(
                f"caption.max_tiles is set but {name} does not cut images into tiles; unset "
                "it for this model"
            )
        kwargs["max_patches"] = settings.max_tiles
    if settings.min_pixels is not None or settings.max_pixels is not None:
        if not hasattr(image_processor, "merge_size"):
            raise ValueError(
                f"caption.min_pixels / max_pixels are set but {name} does not scale images "
                "to a pixel budget (Qwen2-VL's processors do); unset them for this model"
            )
        own = image_processor.size
        kwargs["size"] = {
            "shortest_edge": settings.min_pixels or own["shortest_edge"],
            "longest_edge": settings.max_pixels or own["longest_edge"],
        }
    return kwargs


def batch_order(samples: list[Sample]) -> list[int]:
    """Sample indices with images of similar shape and size next to each other.

    Tiling (InternVL) and native-resolution (Qwen2-VL) processors give an image as many
    tokens as its aspect ratio and size call for; batching alike images wastes less
    compute on padding. Sizes come from the ingest metadata, so no image is decoded.
    """

    def shape(index: int) -> tuple[int, int, int]:
        meta = samples[index].meta
        width, height = int(meta.get("width", 1)), int(meta.get("height", 1))
        return round(2 * math.log2(max(width, 1) / max(height, 1))), width * height, index

    return sorted(range(len(samples)), key=shape)


def run(
    shard_tar: str | Path,
    out_parquet: str | Path,
    settings: CaptionSettings,
    shard_id: str,
    deployment: engine.Deployment | None = None,
) -> dict[str, int]:
    """Caption every image of ``shard_tar``; one output row per input key.

    Resumable: see vlmflow.core.progress. Raises ``Interrupted`` on SIGTERM (progress saved).
    """
    samples = list(iter_samples(shard_tar))
    keys = [sample.key for sample in samples]
    settings_json = json.dumps({k: v for k, v in asdict(settings).items() if k != "prompt"})
    record = {
        "model": settings.model,
        "prompt_id": prompt_id(settings.prompt),
        "settings": settings_json,
    }
    progress = ProgressFile(
        progress_path(out_parquet),
        fingerprint("caption", record, shard_id, input_state(shard_tar)),
    )

    def row(sample: Sample, caption: str, failure: str | None, by: str | None) -> dict[str, Any]:
        return {
            "key": sample.key,
            "web_caption": sample.web_caption,
            "vlm_caption": caption,
            "failure": failure,
            "engine": by,
            **record,
        }

    def failed_row(index: int, error: BaseException) -> dict[str, Any]:
        return row(samples[index], "", f"caption_error: {error}", None)

    with ExitStack() as stack:
        captioner = None
        if any(key not in progress.done for key in keys):
            # Loaded here, not inside a batch: a model that cannot load (or a setting it
            # does not take) is an error of the job, never a failure of the samples.
            captioner = _captioner(settings, samples, shard_id, stack, deployment)

        # HF: one seed per batch, from the shard and the batch's first key; vLLM: one per
        # key. Either way a shard's captions depend neither on other shards nor on where
        # an earlier attempt was stopped.
        desc, order = f"caption {shard_id}", batch_order(samples)
        if captioner is not None and captioner.stream is not None:
            stream, window, by = captioner.stream, captioner.window, captioner.engine

            def captioned(index: int, text: str) -> dict[str, Any]:
                return row(samples[index], text, None, by)

            done = run_stream(keys, stream, captioned, failed_row, progress, desc, order, window)
        else:

            def run_batch(indices: list[int]) -> list[dict[str, Any]]:
                assert captioner is not None and captioner.caption is not None
                captions = captioner.caption(indices)
                return [
                    row(samples[i], text, None, captioner.engine)
                    for i, text in zip(indices, captions, strict=True)
                ]

            seed = (settings.seed, "caption", shard_id)
            done = run_batches(
                keys, settings.batch_size, run_batch, failed_row, progress, seed, desc, order
            )
    rows = [done[key] for key in keys]
    write_rows_parquet(out_parquet, rows, CAPTION_SCHEMA)
    progress.remove()
    failed = sum(1 for r in rows if r["failure"] is not None)
    counts = {"in": len(rows), "ok": len(rows) - failed, "failed": failed}
    log.info("shard %s: %s", shard_id, counts)
    return counts


@dataclass(frozen=True)
class Captioner:
    """Captions of samples by index, a batch at a time (``caption``) or as an engine's
    window of requests answers (``stream``: (index, caption or that sample's error)), and
    the engine that writes them."""

    caption: Callable[[list[int]], list[str]] | None
    engine: str
    stream: Callable[[list[int]], Iterator[tuple[int, str | BaseException]]] | None = None
    window: int = 1  # stream: requests in flight, and rows saved to the progress file at once


def _captioner(
    settings: CaptionSettings,
    samples: list[Sample],
    shard_id: str,
    stack: ExitStack,
    deployment: engine.Deployment | None,
) -> Captioner:
    if settings.backend == "vllm":
        return _vllm_captioner(settings, samples, shard_id, stack, deployment)
    processor, model = load_vlm(settings)
    if not internvl_chat.is_chat_model(model):
        processor_kwargs(processor, settings)

    def caption(indices: list[int]) -> list[str]:
        return caption_batch(processor, model, [samples[i] for i in indices], settings)

    return Captioner(caption, hf_engine())


def _vllm_captioner(
    settings: CaptionSettings,
    samples: list[Sample],
    shard_id: str,
    stack: ExitStack,
    deployment: engine.Deployment | None,
) -> Captioner:
    """Chat requests with the image and the prompt to the vLLM engine, one seed per key.

    The InternVL chat family (InternVL-Chat-V1.5, ...) runs on vLLM's own implementation:
    vLLM tiles each image from the model's config.json (``caption.max_tiles`` becomes its
    ``max_dynamic_patch``), and answers stop at the end of the family's chat turn as
    ``batch_chat``'s do."""
    from transformers import AutoTokenizer

    family = resolve_route(settings) == INTERNVL_CHAT
    if (
        (settings.max_tiles is not None and not family)
        or settings.min_pixels
        or settings.max_pixels
    ):
        raise ValueError(
            "caption.max_tiles / min_pixels / max_pixels are processor settings of the hf "
            "backend (with backend vllm, max_tiles is taken by the InternVL chat family "
            "only); unset them"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        **pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
    )
    extra: dict[str, Any] = {}
    stop_ids: list[int] = []
    if family:
        extra = internvl_chat.vllm_engine_options(settings.max_tiles)
        stop_ids = internvl_chat.turn_end_ids(settings.model, tokenizer)
    session = engine.open_session(settings, deployment, stack, extra=extra, stop_ids=stop_ids)

    def image_of(index: int) -> tuple[bytes, str]:
        return samples[index].image_data, IMAGE_FORMATS[samples[index].image_ext]

    def seed_of(index: int) -> int:
        return stable_seed(settings.seed, "caption", shard_id, samples[index].key)

    def captions(indices: list[int]) -> Iterator[tuple[int, str | BaseException]]:
        answers = engine.stream_chat_with_images(
            session, image_of, settings.prompt, seed_of, indices
        )
        return engine.decoded(answers, tokenizer)

    return Captioner(None, f"vllm {session.engine.version}", captions, session.window)


# Data-URL media types of the shard members' image formats.
IMAGE_FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}


def check_model(
    reference: str, folder: str | None, trust_remote_code: bool, backend: str = "hf"
) -> None:
    """The captioner's architecture is one a caption route of ``backend`` can load."""
    if folder is None:
        return
    try:
        vlm_route(folder, trust_remote_code, backend)
    except ValueError as error:
        raise ConfigError(f"config.models.vlm: {reference!r}: {error}") from None
