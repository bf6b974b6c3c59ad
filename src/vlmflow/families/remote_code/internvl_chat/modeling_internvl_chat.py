"""The InternVL chat-model family (``InternVLChatModel``) for vlmflow's miniature of
InternVL-Chat-V1.5 / InternVL2 / InternVL2.5.

Written for vlmflow from the family's published interface (the model cards'
``model.chat`` / ``model.batch_chat`` usage and config.json fields); it is not
OpenGVLab's file. Image tiles go through a ViT (transformers' ``InternVLVisionModel``),
a pixel shuffle folds each 2x2 block of patch features into one token, an MLP
(``mlp1``) projects them into the language model's embedding space, and they replace
the ``<IMG_CONTEXT>`` tokens of the prompt before the language model generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.internvl.modeling_internvl import InternVLVisionModel

from .configuration_internvl_chat import InternVLChatConfig

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

DEFAULT_SYSTEM_MESSAGE = "You are an AI assistant who looks at images and answers about them."


@dataclass(frozen=True)
class Template:
    """A conversation format: system turn, user and assistant turn openers, turn end."""

    system: str  # the system turn, with {system_message}
    user: str
    assistant: str
    sep: str  # ends every turn; its stripped form is the end-of-turn token

    def prompt(self, system_message: str, turns: list[tuple[str, str | None]]) -> str:
        """The prompt text of a conversation; the last answer None opens the reply."""
        text = self.system.format(system_message=system_message) + self.sep
        for question, answer in turns:
            text += self.user + question + self.sep + self.assistant
            if answer is not None:
                text += answer + self.sep
        return text


_CHATML = Template(
    system="<|im_start|>system\n{system_message}",
    user="<|im_start|>user\n",
    assistant="<|im_start|>assistant\n",
    sep="<|im_end|>",
)
# The ChatML-format templates the family's configs name (template field of config.json).
TEMPLATES = {
    "internlm2-chat": _CHATML,
    "Hermes-2": _CHATML,
    "internvl2_5": Template(_CHATML.system, _CHATML.user, _CHATML.assistant, "<|im_end|>\n"),
    "phi3-chat": Template(
        "<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>"
    ),
}


def get_template(name: str | None) -> Template:
    if name not in TEMPLATES:
        raise ValueError(
            f"unknown conversation template {name!r}: expected one of {list(TEMPLATES)}"
        )
    return TEMPLATES[name]


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = [  # noqa: RUF012 (transformers reads it as a class attribute)
        "InternVLVisionLayer",
        "LlamaDecoderLayer",
        "Qwen2DecoderLayer",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: InternVLChatConfig) -> None:
        super().__init__(config)
        # Sub-configs: config objects once the configuration class has built them.
        vision: Any = config.vision_config
        llm: Any = config.llm_config
        image_size = config.force_image_size or _side(vision.image_size)
        patch_size = _side(vision.patch_size)
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // patch_size) ** 2 * config.downsample_ratio**2)
        self.system_message = config.system_message or DEFAULT_SYSTEM_MESSAGE
        # Set by chat / batch_chat from the tokenizer they are given.
        self.img_context_token_id: int | None = None

        self.vision_model = InternVLVisionModel(vision)
        self.language_model = AutoModelForCausalLM.from_config(llm)
        folded = vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm_hidden = llm.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(folded),
            nn.Linear(folded, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.post_init()

    # -- vision -------------------------------------------------------------------------

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """(n, w, h, c) patch features to (n, w*s, h*s, c/s^2): each 1/s x 1/s block of
        neighbouring patches becomes one feature vector."""
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.transpose(1, 2).reshape(
            n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor**2)
        )
        # Version 1 leaves the two spatial axes swapped; version 2 swaps them back.
        return x if self.ps_version == "v1" else x.transpose(1, 2).contiguous()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens of each tile: (tiles, num_image_token, LLM hidden size)."""
        parameter = next(self.vision_model.parameters())
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if self.select_layer == -1:
            features = self.vision_model(pixel_values=pixel_values).last_hidden_state
        else:
            output = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
            features = output.hidden_states[self.select_layer]
        features = features[:, 1:, :]  # drop the class token
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1)
        features = self.pixel_shuffle(features, scale_factor=self.downsample_ratio)
        features = features.reshape(features.shape[0], -1, features.shape[-1])
        return self.mlp1(features)

    # -- generation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: Any = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """The language model's ``generate`` on the prompt's embeddings, with the image
        tokens in the ``<IMG_CONTEXT>`` positions; returns the new tokens only."""
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        embeddings = self.language_model.get_input_embeddings()
        input_ids = input_ids.to(embeddings.weight.device)
        inputs_embeds = embeddings(input_ids)
        if pixel_values is not None or visual_features is not None:
            if self.img_context_token_id is None:
                raise ValueError("img_context_token_id is unset: call chat or batch_chat")
            if visual_features is None:
                assert pixel_values is not None
                visual_features = self.extract_feature(pixel_values)
            slots = input_ids == self.img_context_token_id
            image_tokens = visual_features.reshape(-1, inputs_embeds.shape[-1])
            if int(slots.sum()) != image_tokens.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} {IMG_CONTEXT_TOKEN} tokens in the prompt for "
                    f"{image_tokens.shape[0]} image tokens"
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                slots.unsqueeze(-1), image_tokens.to(inputs_embeds)
            )
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            use_cache=True,
            **generate_kwargs,
        )

    def _query(self, question: str, num_patches_list: list[int], history: Any = None) -> str:
        turns = [*(history or []), (question, None)]
        query = get_template(self.template).prompt(self.system_message, turns)
        for num_patches in num_patches_list:
            image = (
                IMG_START_TOKEN
                + IMG_CONTEXT_TOKEN * self.num_image_token * num_patches
                + IMG_END_TOKEN
            )
            query = query.replace(IMAGE_PLACEHOLDER, image, 1)
        return query

    def _reply(self, tokenizer: Any, output: torch.Tensor) -> list[str]:
        end_of_turn = get_template(self.template).sep.strip()
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.split(end_of_turn)[0].strip() for text in texts]

    def _generate_from_queries(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        queries: list[str],
        generation_config: dict[str, Any],
    ) -> list[str]:
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        end_of_turn = get_template(self.template).sep.strip()
        tokenizer.padding_side = "left"
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
        kwargs = {**generation_config, "eos_token_id": tokenizer.convert_tokens_to_ids(end_of_turn)}
        output = self.generate(
            pixel_values=pixel_values,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **kwargs,
        )
        return self._reply(tokenizer, output)

    def chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict[str, Any],
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
    ) -> Any:
        """One answer to ``question`` about the images in ``pixel_values`` (their tiles,
        ``num_patches_list`` per image; default: all tiles are one image)."""
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError("num_patches_list does not add up to the tiles in pixel_values")
        query = self._query(question, num_patches_list, history)
        response = self._generate_from_queries(tokenizer, pixel_values, [query], generation_config)[
            0
        ]
        if return_history:
            return response, [*(history or []), (question, response)]
        return response

    def batch_chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        questions: list[str],
        generation_config: dict[str, Any],
        num_patches_list: list[int] | None = None,
        history: Any = None,
        return_history: bool = False,
    ) -> list[str]:
        """One answer per question, each about one image: image ``i`` is the next
        ``num_patches_list[i]`` tiles of ``pixel_values``. Prompts are left-padded and
        generated together."""
        if history is not None or return_history:
            raise NotImplementedError("batch_chat answers single-turn questions only")
        if num_patches_list is None:
            raise ValueError("batch_chat needs num_patches_list (the tiles of each image)")
        if len(num_patches_list) != len(questions):
            raise ValueError("batch_chat needs one num_patches_list entry per question")
        queries = []
        for question, num_patches in zip(questions, num_patches_list, strict=True):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            queries.append(self._query(question, [num_patches]))
        return self._generate_from_queries(tokenizer, pixel_values, queries, generation_config)

    # -- embeddings ---------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()


def _side(size: Any) -> int:
    """An image or patch size given as an int or as (height, width)."""
    return int(size[0] if isinstance(size, list | tuple) else size)
