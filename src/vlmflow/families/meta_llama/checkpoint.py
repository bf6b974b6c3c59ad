"""Meta's checkpoint format: its files (consolidated.NN.pth, params.json), the Llama 3
tokenizer (tiktoken) with its special tokens and chat format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
