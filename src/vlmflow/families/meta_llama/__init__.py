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

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmflow.families.meta_llama.checkpoint import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    END_OF_TURN,
    HF_CHAT_TEMPLATE,
    LLAMA3_PATTERN,
    NUM_SPECIAL_TOKENS,
    START_HEADER,
    MetaCheckpointError,
    MetaTokenizer,
    checkpoint_files,
    is_meta_checkpoint,
    model_parallel_size,
    special_token_names,
)
from vlmflow.families.meta_llama.convert import (
    convert_to_hf,
    merge_state,
    split_state,
    write_tokenizer_model,
)
from vlmflow.families.meta_llama.model import (
    MetaParams,
    Transformer,
)

log = logging.getLogger(__name__)


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


__all__ = [
    "BEGIN_OF_TEXT",
    "END_HEADER",
    "END_OF_TEXT",
    "END_OF_TURN",
    "HF_CHAT_TEMPLATE",
    "LLAMA3_PATTERN",
    "NUM_SPECIAL_TOKENS",
    "START_HEADER",
    "MetaCheckpointError",
    "MetaLlama",
    "MetaParams",
    "MetaTokenizer",
    "Transformer",
    "checkpoint_files",
    "convert_to_hf",
    "is_meta_checkpoint",
    "join_model_parallel",
    "leave_model_parallel",
    "merge_state",
    "model_parallel_size",
    "special_token_names",
    "split_state",
    "write_tokenizer_model",
]
