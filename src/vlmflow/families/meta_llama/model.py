"""Llama in Meta's own format: the checkpoint's params.json and the model built from
fairscale's model-parallel layers, as Meta's reference code builds it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmflow.families.meta_llama.checkpoint import MetaCheckpointError

# Llama 3's pre-tokenizer pattern (tiktoken ``pat_str``).


@dataclass(frozen=True)
class MetaParams:
    """``params.json`` of a Meta Llama checkpoint."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    max_seq_len: int = 2048

    @classmethod
    def read(cls, folder: str | Path, max_seq_len: int = 2048) -> MetaParams:
        path = Path(folder) / "params.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MetaCheckpointError(f"{path}: cannot read: {error}") from None
        if not isinstance(data, dict):
            raise MetaCheckpointError(f"{path}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [
            name for name in ("dim", "n_layers", "n_heads", "vocab_size") if name not in data
        ]
        if missing:
            raise MetaCheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "n_kv_heads", "multiple_of"):
            value = data.get(name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise MetaCheckpointError(
                    f"{path}: {name} must be a positive integer, got {value!r}"
                )
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("max_seq_len", max_seq_len)
        return cls(**values)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The feed-forward width Meta derives from dim, multiple_of and the multiplier."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.pop("max_seq_len")  # a run-time limit, not part of Meta's params.json
        return data


# --- the model, from fairscale's model-parallel layers -------------------------------


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    # Weights come from the checkpoint: skip the random initialisation of every layer.
    return tensor


def rope_frequencies(params: MetaParams, length: int) -> torch.Tensor:
    """Complex rotations e^{i t f} for positions t < length (Llama 3.1 scaling if set)."""
    dim = params.head_dim
    freqs = 1.0 / (params.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if params.use_scaled_rope:
        freqs = _llama31_scaled(freqs)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


# Llama 3.1's long-context rope scaling (factor 8, original context 8192).
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama31_scaled(freqs: torch.Tensor) -> torch.Tensor:
    factor = LLAMA31_ROPE["factor"]
    low, high = LLAMA31_ROPE["low_freq_factor"], LLAMA31_ROPE["high_freq_factor"]
    context = LLAMA31_ROPE["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelength > context / low, freqs / factor, blended)
    return torch.where(wavelength < context / high, freqs, scaled)


def _rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    # Meta's layout: consecutive pairs (x0, x1), (x2, x3), ... are complex numbers.
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * rotations[None, :, None, :]).flatten(3)
    return rotated.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, params: MetaParams, parallel: int) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.local_heads = params.n_heads // parallel
        self.local_kv_heads = params.kv_heads // parallel
        self.head_dim = params.head_dim
        dim, kv_dim = params.dim, params.kv_heads * params.head_dim
        column = {"bias": False, "gather_output": False, "init_method": _no_init}
        self.wq = ColumnParallelLinear(dim, params.n_heads * params.head_dim, **column)
        self.wk = ColumnParallelLinear(dim, kv_dim, **column)
        self.wv = ColumnParallelLinear(dim, kv_dim, **column)
        self.wo = RowParallelLinear(
            params.n_heads * params.head_dim,
            dim,
            bias=False,
            input_is_parallel=True,
            init_method=_no_init,
        )

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        rotations: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, self.local_heads, self.head_dim)
        k = self.wk(x).view(batch, length, self.local_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, length, self.local_kv_heads, self.head_dim)
        q, k = _rotate(q, rotations), _rotate(k, rotations)
        cache_k, cache_v = cache
        cache_k[:batch, start : start + length] = k
        cache_v[:batch, start : start + length] = v
        keys = cache_k[:batch, : start + length]
        values = cache_v[:batch, : start + length]
        # Grouped-query attention: each key/value head serves local_heads/local_kv_heads
        # consecutive query heads.
        repeat = self.local_heads // self.local_kv_heads
        keys = keys.repeat_interleave(repeat, dim=2)
        values = values.repeat_interleave(repeat, dim=2)
        mask = None
        if length > 1:  # causal, offset by the cached positions
            mask = torch.ones(length, start + length, dtype=torch.bool, device=x.device).tril(start)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        )
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, params: MetaParams) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        hidden = params.ffn_hidden
        column = {"bias": False, "gather_output": False, "init_method": _no_init}
        self.w1 = ColumnParallelLinear(params.dim, hidden, **column)
        self.w3 = ColumnParallelLinear(params.dim, hidden, **column)
        self.w2 = RowParallelLinear(
            hidden, params.dim, bias=False, input_is_parallel=True, init_method=_no_init
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, params: MetaParams, parallel: int) -> None:
        super().__init__()
        self.attention = Attention(params, parallel)
        self.feed_forward = FeedForward(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        rotations: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start, rotations, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 with Meta's parameter names, so ``consolidated.NN.pth`` loads as is."""

    def __init__(self, params: MetaParams, parallel: int) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding

        super().__init__()
        for name, value in (("n_heads", params.n_heads), ("n_kv_heads", params.kv_heads)):
            if value % parallel:
                raise MetaCheckpointError(
                    f"{name}={value} does not split over {parallel} model-parallel ranks"
                )
        self.params = params
        self.parallel = parallel
        self.tok_embeddings = VocabParallelEmbedding(
            params.vocab_size, params.dim, init_method=_no_init
        )
        self.layers = nn.ModuleList(Block(params, parallel) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = ColumnParallelLinear(
            params.dim, params.vocab_size, bias=False, init_method=_no_init
        )
        # Not a buffer: Module.to(dtype) would cast the complex rotations to real.
        self.rotations = rope_frequencies(params, params.max_seq_len * 2)

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, length, self.params.kv_heads // self.parallel, self.params.head_dim)
        like = self.norm.weight
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(self.params.n_layers)]

    def forward(
        self, tokens: torch.Tensor, start: int, cache: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.rotations.device != h.device:
            self.rotations = self.rotations.to(h.device)
        rotations = self.rotations[start : start + tokens.shape[1]]
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, start, rotations, layer_cache)
        return self.output(self.norm(h)).float()
