"""Llama 3 checkpoints in Meta's own format, run the way Meta's reference code runs them.

Meta ships Llama 3 (e.g. ``Meta-Llama-3-8B-Instruct/original``) as a folder holding

- ``consolidated.00.pth`` ... ``consolidated.NN.pth``: one state dict per model-parallel
  rank (8B: one file, 70B: eight);
- ``params.json``: the architecture (dim, n_layers, n_heads, n_kv_heads, vocab_size,
  multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope);
- ``tokenizer.model``: a tiktoken BPE (one ``base64(token) rank`` line per token), whose
  256 special tokens follow the ordinary ones.

The model here is built from fairscale's model-parallel layers, as Meta's reference is,
so rank r of an N-way job loads only ``consolidated.0r.pth``: column-parallel layers
(wq, wk, wv, w1, w3, output) and the vocab-parallel embedding hold rows r/N of the full
matrix, row-parallel layers (wo, w2) its columns r/N. An N-file checkpoint needs N
processes (``torchrun --nproc-per-node=N``); with one file it runs in the calling process.

``convert_to_hf`` writes the same weights as a ``LlamaForCausalLM`` folder (rotary
halves re-ordered, shards merged) with a tokenizer converted from ``tokenizer.model``,
which is how the tests show both paths give the same answers.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlmflow.core.io import atomic_dir, atomic_open

log = logging.getLogger(__name__)

# Llama 3's pre-tokenizer pattern (tiktoken ``pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"

# Llama 3's chat template as a Hugging Face tokenizer carries it: the same tokens as
# ChatFormat.encode_dialog below.
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def special_token_names(count: int = NUM_SPECIAL_TOKENS) -> list[str]:
    """Llama 3's special tokens in id order (reserved slots numbered as Meta numbers them)."""
    named = {0: BEGIN_OF_TEXT, 1: END_OF_TEXT, 6: START_HEADER, 7: END_HEADER, 9: END_OF_TURN}
    names, reserved = [], 0
    for slot in range(count):
        if slot in named:
            names.append(named[slot])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


class MetaCheckpointError(ValueError):
    """A Meta-format checkpoint folder that cannot be used, with the file at fault."""


def is_meta_checkpoint(reference: str | Path) -> bool:
    folder = Path(reference)
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The ``consolidated.NN.pth`` files in rank order; a gap in the numbering is an error."""
    files = sorted(Path(folder).glob("consolidated.*.pth"))
    for rank, path in enumerate(files):
        if path.name != f"consolidated.{rank:02d}.pth":
            raise MetaCheckpointError(
                f"{folder}: expected consolidated.{rank:02d}.pth for model-parallel rank "
                f"{rank}, found {path.name}"
            )
    if not files:
        raise MetaCheckpointError(f"{folder}: no consolidated.NN.pth files")
    return files


def model_parallel_size(folder: str | Path) -> int:
    return len(checkpoint_files(folder))


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


class MetaTokenizer:
    """``tokenizer.model`` through tiktoken, with Llama 3's pattern and special tokens."""

    def __init__(self, path: str | Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        try:
            ranks = load_tiktoken_bpe(str(path))
        except (OSError, ValueError) as error:
            raise MetaCheckpointError(f"{path}: not a tiktoken BPE file: {error}") from None
        self.num_base_tokens = len(ranks)
        self.special = {
            name: self.num_base_tokens + i for i, name in enumerate(special_token_names())
        }
        self.encoding = tiktoken.Encoding(
            name=Path(path).parent.name or "llama3",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special,
        )
        self.bos_id = self.special[BEGIN_OF_TEXT]
        self.eos_id = self.special[END_OF_TEXT]
        self.eot_id = self.special[END_OF_TURN]
        # An instruct model ends its turn with <|eot_id|>; a base model with EOS.
        self.stop_ids = (self.eos_id, self.eot_id)

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + len(self.special)

    def encode(self, text: str) -> list[int]:
        # Special-token text inside data (a caption saying "<|eot_id|>") stays plain
        # text: only the chat format inserts special tokens.
        return list(self.encoding.encode(text, allowed_special=set(), disallowed_special=()))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens left out (as skip_special_tokens does)."""
        return str(self.encoding.decode([i for i in ids if i < self.num_base_tokens]))

    def encode_dialog(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Llama 3's chat format, ending with an open assistant header."""
        tokens = [self.bos_id]
        for message in messages:
            tokens += self._header(message["role"])
            tokens += self.encode(message["content"].strip())
            tokens.append(self.eot_id)
        return tokens + self._header("assistant")

    def _header(self, role: str) -> list[int]:
        return [
            self.special[START_HEADER],
            *self.encode(role),
            self.special[END_HEADER],
            *self.encode("\n\n"),
        ]


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


# --- loading and generation ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_model_parallel(size: int) -> int:
    """Join (or start) the process group and fairscale's model-parallel groups; this
    process's model-parallel rank."""
    import fairscale.nn.model_parallel.initialize as fs_init

    from vlmflow.core import distributed

    launched = distributed.rank_from_env()
    if not dist.is_initialized() and launched.world_size > 1:
        distributed.init(launched)  # torchrun's or srun's variables
    if not dist.is_initialized():
        if size > 1:
            raise MetaCheckpointError(
                f"this checkpoint has {size} model-parallel shards (consolidated.NN.pth): it "
                f"needs {size} processes, e.g. torchrun --nproc-per-node={size}"
            )
        # One shard: a process group of one, in this process.
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
        )
    if dist.get_world_size() != size:
        raise MetaCheckpointError(
            f"this checkpoint has {size} model-parallel shards but {dist.get_world_size()} "
            f"processes were started; start exactly {size}"
        )
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(size)
    return int(fs_init.get_model_parallel_rank())


def leave_model_parallel() -> None:
    """Tear down fairscale's groups and the process group (after an in-process run)."""
    import fairscale.nn.model_parallel.initialize as fs_init

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class MetaLlama:
    """A loaded Meta-format Llama 3 with its tokenizer, ready to answer chats."""

    model: Transformer
    tokenizer: MetaTokenizer
    rank: int

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype, max_seq_len: int = 2048) -> MetaLlama:
        folder = Path(folder)
        files = checkpoint_files(folder)
        params = MetaParams.read(folder, max_seq_len)
        tokenizer = MetaTokenizer(folder / "tokenizer.model")
        if tokenizer.vocab_size != params.vocab_size:
            raise MetaCheckpointError(
                f"{folder / 'tokenizer.model'}: {tokenizer.vocab_size} tokens with the "
                f"special ones, but params.json says vocab_size {params.vocab_size}"
            )
        rank = join_model_parallel(len(files))
        on = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        )
        # weights_only: a checkpoint file cannot run code when it is read.
        state = torch.load(files[rank], map_location="cpu", weights_only=True, mmap=True)
        state.pop("rope.freqs", None)  # Llama 2 kept the rotations in the file
        model = Transformer(params, len(files))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise MetaCheckpointError(
                f"{files[rank]}: does not fit params.json split {len(files)} ways: {error}"
            ) from None
        model = model.to(dtype=dtype, device=on).eval()
        log.info(
            "loaded %s shard %d/%d: %d layers, dim %d, %s",
            folder,
            rank,
            len(files),
            params.n_layers,
            params.dim,
            dtype,
        )
        return cls(model, tokenizer, rank)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> list[list[int]]:
        """New tokens of each prompt, up to its first stop token (excluded).

        All rows advance together from the shortest prompt's end; a row still inside its
        prompt keeps its prompt token, so every row sees exactly its own tokens at their
        own positions (no padding inside the attention span).
        """
        limit = self.model.params.max_seq_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise ValueError(f"prompt of {longest} tokens does not fit max_seq_len {limit}")
        shortest = min(len(p) for p in prompts)
        total = min(limit, longest + max_new_tokens)
        on = self.model.norm.weight.device
        tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=on)
        in_prompt = torch.zeros_like(tokens, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
            in_prompt[row, : len(prompt)] = True
        stops = torch.tensor(self.tokenizer.stop_ids, device=on)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=on)
        cache = self.model.new_cache(len(prompts), total)
        done_until = 0
        for position in range(shortest, total):
            logits = self.model(tokens[:, done_until:position], done_until, cache)[:, -1]
            chosen = _pick(logits, do_sample, temperature, top_p)
            chosen = torch.where(in_prompt[:, position], tokens[:, position], chosen)
            tokens[:, position] = chosen
            finished |= ~in_prompt[:, position] & torch.isin(chosen, stops)
            done_until = position
            if bool(finished.all()):
                break
        answers = []
        for row, prompt in enumerate(prompts):
            new = tokens[row, len(prompt) : len(prompt) + max_new_tokens].tolist()
            for index, token in enumerate(new):
                if token in self.tokenizer.stop_ids:
                    new = new[:index]
                    break
            answers.append(new)
        return answers

    def chat(self, user_prompts: Sequence[str], **generation: Any) -> list[str]:
        """One-turn chats: the assistant's answer to each user prompt."""
        encoded = [
            self.tokenizer.encode_dialog([{"role": "user", "content": p}]) for p in user_prompts
        ]
        return [self.tokenizer.decode(ids).strip() for ids in self.generate(encoded, **generation)]

    def prompt_lengths(self, user_prompts: Sequence[str]) -> list[int]:
        return [
            len(self.tokenizer.encode_dialog([{"role": "user", "content": p}]))
            for p in user_prompts
        ]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Nucleus: keep the most likely tokens up to top_p of the mass (at least one).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picked = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(-1, picked).squeeze(-1)


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
