"""The engine's token log-probabilities in OpenAI's two shapes.

Completions use the legacy object (parallel lists: tokens, token_logprobs, top_logprobs as
{token: logprob}, text_offset); chat uses a list of {token, logprob, bytes, top_logprobs}.
Tokens are named by their own decoded text (Engine.token_strings), the same for a chosen
token and for an alternative, so a client can compare them (lm-evaluation-harness decides
"greedy" by whether the chosen token's logprob is the largest of the alternatives).
"""

from __future__ import annotations

from typing import Callable, Sequence

from server.api.openai_schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.contract import TokenLogprob

TokenStrings = Callable[[Sequence[int]], list[str]]


def _names(entries: Sequence[tuple[int, TokenLogprob | None]], strings: TokenStrings) -> dict[int, str]:
    ids = {token for token, _ in entries}
    ids.update(i for _, entry in entries if entry is not None for i, _ in entry.top)
    ordered = sorted(ids)
    return dict(zip(ordered, strings(ordered)))


def completion_logprobs(entries: Sequence[tuple[int, TokenLogprob | None]], strings: TokenStrings,
                        text_start: int = 0) -> CompletionLogprobs:
    """entries: (token id, its logprob or None) in text order; text_start: where the first
    token's text begins in the choice's `text`."""
    names = _names(entries, strings)
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_start
    for token, entry in entries:
        tokens.append(names[token])
        offsets.append(offset)
        offset += len(names[token])
        token_logprobs.append(entry.logprob if entry is not None else None)
        top_logprobs.append(_top_by_name(entry, names) if entry is not None else None)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=offsets)


def _top_by_name(entry: TokenLogprob, names: dict[int, str]) -> dict[str, float]:
    """Alternatives keyed by text; two tokens with one text (byte pieces that both decode to
    U+FFFD) keep the likelier's value, so the most likely alternative is never understated."""
    top: dict[str, float] = {}
    for token, value in entry.top:
        top.setdefault(names[token], value)
    return top


def chat_logprobs(entries: Sequence[TokenLogprob], strings: TokenStrings) -> ChatLogprobs:
    names = _names([(e.token_id, e) for e in entries], strings)

    def top(token: int, value: float) -> TopLogprob:
        return TopLogprob(token=names[token], logprob=value, bytes=list(names[token].encode()))

    content = [
        ChatTokenLogprob(token=names[e.token_id], logprob=e.logprob, bytes=list(names[e.token_id].encode()),
                         top_logprobs=[top(i, v) for i, v in e.top])
        for e in entries
    ]
    return ChatLogprobs(content=content)
