"""Writing Meta-format checkpoints: a model's state split over model-parallel ranks (and
merged back), the tokenizer file, and the conversion to a transformers folder."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlmflow.core.io import atomic_dir, atomic_open
from vlmflow.families.meta_llama.checkpoint import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    HF_CHAT_TEMPLATE,
    LLAMA3_PATTERN,
    MetaTokenizer,
    checkpoint_files,
    special_token_names,
)
from vlmflow.families.meta_llama.model import (
    LLAMA31_ROPE,
    MetaParams,
)

# Llama 3's pre-tokenizer pattern (tiktoken ``pat_str``).

# --- writing checkpoints: the demo model and the conversion to Hugging Face ------------

# How each weight is split across model-parallel ranks (dimension), None = replicated.
_SPLIT_DIM = {
    "tok_embeddings": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
}


def _split_dim(name: str) -> int | None:
    parts = name.split(".")
    return _SPLIT_DIM.get(parts[-2]) if len(parts) >= 2 else None


def split_state(full: dict[str, torch.Tensor], parallel: int) -> list[dict[str, torch.Tensor]]:
    """The per-rank state dicts of a full (unsplit) Meta state dict."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parallel)]
    for name, tensor in full.items():
        dim = _split_dim(name)
        pieces = [tensor] * parallel if dim is None else list(tensor.chunk(parallel, dim=dim))
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone()
    return shards


def merge_state(shards: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full state dict of per-rank ones (the inverse of ``split_state``)."""
    merged = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        dim = _split_dim(name)
        merged[name] = (
            shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
        )
    return merged


def write_tokenizer_model(ranks: dict[bytes, int], path: str | Path) -> None:
    with atomic_open(path) as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(f"{base64.b64encode(token).decode()} {rank}\n")


def _unpair_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    # Meta rotates consecutive pairs (0,1), (2,3)...; transformers rotates the halves
    # (i, i + d/2). Re-order each head's output rows so both compute the same thing.
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def convert_to_hf(meta_dir: str | Path, out_dir: str | Path) -> None:
    """Write a Meta-format checkpoint as a ``LlamaForCausalLM`` folder with tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta_dir = Path(meta_dir)
    params = MetaParams.read(meta_dir)
    shards = [
        torch.load(path, map_location="cpu", weights_only=True)
        for path in checkpoint_files(meta_dir)
    ]
    full = merge_state(shards)
    tokenizer = MetaTokenizer(meta_dir / "tokenizer.model")
    state = {
        "model.embed_tokens.weight": full["tok_embeddings.weight"],
        "model.norm.weight": full["norm.weight"],
        "lm_head.weight": full["output.weight"],
    }
    for i in range(params.n_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        state |= {
            hf + "self_attn.q_proj.weight": _unpair_rotary(
                full[meta + "attention.wq.weight"], params.n_heads
            ),
            hf + "self_attn.k_proj.weight": _unpair_rotary(
                full[meta + "attention.wk.weight"], params.kv_heads
            ),
            hf + "self_attn.v_proj.weight": full[meta + "attention.wv.weight"],
            hf + "self_attn.o_proj.weight": full[meta + "attention.wo.weight"],
            hf + "mlp.gate_proj.weight": full[meta + "feed_forward.w1.weight"],
            hf + "mlp.down_proj.weight": full[meta + "feed_forward.w2.weight"],
            hf + "mlp.up_proj.weight": full[meta + "feed_forward.w3.weight"],
            hf + "input_layernorm.weight": full[meta + "attention_norm.weight"],
            hf + "post_attention_layernorm.weight": full[meta + "ffn_norm.weight"],
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": params.rope_theta}
    if params.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": params.rope_theta, **LLAMA31_ROPE}
    config = LlamaConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.dim,
        intermediate_size=params.ffn_hidden,
        num_hidden_layers=params.n_layers,
        num_attention_heads=params.n_heads,
        num_key_value_heads=params.kv_heads,
        rms_norm_eps=params.norm_eps,
        rope_parameters=rope,
        max_position_embeddings=params.max_seq_len,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=list(tokenizer.stop_ids),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config.eos_token_id = list(tokenizer.stop_ids)
    model.generation_config.bos_token_id = tokenizer.bos_id
    names = special_token_names()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=TikTokenConverter(
            vocab_file=str(meta_dir / "tokenizer.model"),
            pattern=LLAMA3_PATTERN,
            extra_special_tokens=names,
        ).converted(),
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TEXT,
        chat_template=HF_CHAT_TEMPLATE,
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
