"""Which request shape a generation adapter answers, decided from its training rows.

The rule, as README states it for users:
  {"input", "target"} and {"prompt", "completion"} rows -> raw: a request's `prompt`
      (/v1/generate `prompt`, /v1/completions), the text exactly as in the row;
  {"messages": [...]} rows -> chat: a request's `messages` (/v1/generate `messages`,
      /v1/chat/completions), through the base's chat template.
`prompt_format: chat` (`--prompt-format chat`) wraps raw rows as one user turn instead, for
a team whose callers speak chat. The decision is recorded in the manifest
(adapters.manifest.PromptFormat), where the server reads it to flag a request in the other
shape, and the report shows the request that reproduces its metric.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

from adapters.manifest import CHAT_ROLES, PromptFormat
from trainer.data import DataError, GenerationExample

PromptFormatChoice = Literal["auto", "raw", "chat"]  # auto = by the rows' shape, the rule above
PROMPT_FORMAT_CHOICES: tuple[str, ...] = ("auto", "raw", "chat")

_WHERE = "<prompt format>"  # DataError's file slot: the problem is the data set, not one line


def resolve_prompt_format(
    train: Sequence[GenerationExample],
    held_out: Sequence[GenerationExample],
    choice: PromptFormatChoice,
    has_chat_template: bool,
) -> tuple[PromptFormat, list[GenerationExample], list[GenerationExample]]:
    """The format for these rows, and the rows as the trainer renders them (wrapped for `chat`)."""
    rows = [*train, *held_out]
    chat_rows = sum(e.is_chat for e in rows)
    if 0 < chat_rows < len(rows):
        raise DataError([(_WHERE, 0,
            f"{chat_rows} chat row(s) ('messages') and {len(rows) - chat_rows} raw row(s) ('input'/'prompt') "
            "in one data set: an adapter answers one request shape, so convert the rows to one shape")])
    if chat_rows and choice == "raw":
        raise DataError([(_WHERE, 0, "prompt_format 'raw' cannot apply to 'messages' rows: chat rows are "
                                     "always rendered with the base's chat template")])
    if not chat_rows and choice != "chat":
        return PromptFormat(kind="raw", source=rows[0].shape), list(train), list(held_out)
    if not has_chat_template:
        raise DataError([(_WHERE, 0, "the base has no chat template, and the server answers `messages` only "
                                     "on a base with one: train on {'prompt', 'completion'} rows instead")])
    train, held_out = [_as_chat(e) for e in train], [_as_chat(e) for e in held_out]
    rows = [*train, *held_out]
    chat = PromptFormat(kind="chat", source=rows[0].shape, roles=_roles(rows), system_prompt=_shared_system_prompt(rows))
    return chat, list(train), list(held_out)


def in_format(examples: Sequence[GenerationExample], prompt_format: PromptFormat | None) -> list[GenerationExample]:
    """Rows rendered as an adapter with `prompt_format` was trained (None: by the rule above),
    so evaluating it asks each question in the shape it answers."""
    if prompt_format is not None and prompt_format.kind == "chat":
        return [_as_chat(e) for e in examples]
    return list(examples)


def _as_chat(example: GenerationExample) -> GenerationExample:
    """A raw row as one user turn; its `shape` stays what the file holds."""
    return example if example.is_chat else dataclasses.replace(example, prompt=(("user", example.prompt),))


def _roles(rows: Sequence[GenerationExample]) -> tuple[str, ...]:
    seen = {role for e in rows for role, _ in e.prompt}
    return tuple(role for role in CHAT_ROLES if role in seen)


def _shared_system_prompt(rows: Sequence[GenerationExample]) -> str | None:
    """The system message that opens every row, when they all share one; else None."""
    openings = {e.prompt[0][1] if e.prompt[0][0] == "system" else None for e in rows}
    return openings.pop() if len(openings) == 1 else None
