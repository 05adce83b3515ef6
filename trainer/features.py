"""Turning examples into model inputs: prompts, answer-only labels, padding.

The prompt's token ids here are the contract with serving: they are made exactly as the
server makes a request's (server/engine TorchEngine.tokenize), so an adapter sees at serve
time the ids it was trained on. A raw prompt (what a request's `prompt` carries) goes
through the tokenizer with its special tokens, e.g. the BOS a Llama tokenizer adds; chat
turns (a request's `messages`) go through the base's chat template with the generation
prompt, whose text already holds every special token. The answer follows the prompt's ids
directly (no space or separator is inserted) and ends with EOS, where the server stops.
Which rows are raw and which chat is decided in trainer/prompt_format.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trainer.data import ClassificationExample, GenerationExample

IGNORE_INDEX = -100  # label value the loss skips: every prompt and padding position


def render_prompt(example: GenerationExample, tokenizer) -> str:
    """The prompt as text (what a report shows); chat rows through the chat template."""
    if not example.is_chat:
        return example.prompt
    messages = [{"role": role, "content": content} for role, content in example.prompt]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(example: GenerationExample, tokenizer) -> list[int]:
    """The ids the server gives the same request: `prompt` = the raw text, `messages` = the turns."""
    if not example.is_chat:
        return list(tokenizer(example.prompt)["input_ids"])
    return list(tokenizer(render_prompt(example, tokenizer), add_special_tokens=False)["input_ids"])


def encode_generation(example: GenerationExample, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + answer + eos; labels mask the prompt so loss is on the answer only."""
    prompt = prompt_ids(example, tokenizer)
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    # Keep the answer whole and cut the prompt from the left: the answer is what is learned.
    room = max_length - len(answer_ids)
    if room < 1:
        answer_ids = answer_ids[: max_length - 1]
        room = 1
    prompt = prompt[-room:]
    return {
        "input_ids": prompt + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt) + answer_ids,
    }


def encode_classification(
    example: ClassificationExample, tokenizer, label_ids: dict[str, int], max_length: int
) -> dict[str, list[int] | int]:
    encoded = tokenizer(example.text, truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "labels": label_ids[example.label]}


@dataclass
class PaddingCollator:
    """Right-pads a batch; token labels (generation) pad with IGNORE_INDEX, scalar labels stay as is."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [batch, seq]
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            attention_mask[i, : len(row["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if isinstance(rows[0]["labels"], int):
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)  # [batch]
        else:
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [batch, seq]
            for i, row in enumerate(rows):
                labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
            batch["labels"] = labels
        return batch


def ensure_pad_token(tokenizer, model_config=None) -> None:
    """Decoders often ship without a pad token; batching and SEQ_CLS pooling need one."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_config is not None and getattr(model_config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-pad token, found via config.pad_token_id.
        model_config.pad_token_id = tokenizer.pad_token_id
