"""Per-row token choice and incremental detokenization with stop strings."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from server.contract import FinishReason, SamplingParams


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [batch, vocab]. Greedy rows take the argmax; the others sample with their own seed."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        scores = logits[row].float() / p.temperature  # [vocab]
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - sorted_scores.softmax(-1) >= p.top_p
            scores = scores.scatter(0, order[drop], float("-inf"))
        probs = scores.softmax(-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    return chosen


class Detokenizer:
    """Turns a growing token list into text deltas, holding back what a stop string might still claim."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0
        self.text = ""

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string ended the text)."""
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        search_from = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        safe = len(self.text) - self.holdback
        # A trailing U+FFFD is usually half of a multi-byte character: wait for the rest.
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(safe), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


def finish_reason_for(
    token: int, eos_ids: set[int], completion_tokens: int, total_tokens: int, params: SamplingParams, max_context: int
) -> FinishReason | None:
    if token in eos_ids:
        return "stop"
    if completion_tokens >= params.max_new_tokens or total_tokens >= max_context:
        return "length"
    return None
