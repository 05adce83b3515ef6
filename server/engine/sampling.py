"""Token choice for a whole step on the logits' device, and incremental detokenization.

Sampling happens where the logits are (CPU or CUDA) in one batched pass over the rows that
sample: temperature, then top-k, then top-p (nucleus), then inverse-CDF sampling with one
uniform number per row. Each row draws its uniforms from its own host-side stream seeded
from the request (`random.Random(seed)`), so a seed gives the same tokens however the row is
batched, no device generator is involved (a CPU generator cannot drive CUDA sampling), and
the global torch RNG is never touched. Greedy rows take the argmax; the step's choices come
back to the host in one read.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from server.contract import FinishReason, SamplingParams
from server.engine.staging import StepBuffer


class UniformStream:
    """A row's own source of uniforms in [0, 1): seeded by the request, or randomly."""

    def __init__(self, seed: int | None):
        self._random = random.Random(seed if seed is not None else secrets.randbits(64))

    def next(self) -> float:
        return self._random.random()


@dataclass(frozen=True)
class SampledRows:
    """The rows of a step that sample, with their parameters as device tensors."""

    rows: torch.Tensor  # [sampled] long: row index into the step's logits
    temperature: torch.Tensor  # [sampled, 1] float32
    top_k: torch.Tensor  # [sampled] long, 0 = off
    top_p: torch.Tensor  # [sampled, 1] float32, 1 = off
    uniform: torch.Tensor  # [sampled] float32 in [0, 1)
    max_top_k: int  # largest top_k among the rows (0: no row uses top-k)
    any_top_p: bool

    @staticmethod
    def stage(buffer: StepBuffer, params: Sequence[SamplingParams],
              streams: Sequence[UniformStream | None]) -> "StagedSampling | None":
        """Write the sampling rows' parameters into the step's buffer (None: every row is
        greedy). Draws one uniform from each sampling row's stream."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return None
        chosen = [params[i] for i in rows]
        longs = buffer.longs(rows + [p.top_k for p in chosen])
        floats = buffer.floats([p.temperature for p in chosen] + [p.top_p for p in chosen]
                               + [streams[i].next() for i in rows])
        return StagedSampling(longs, floats, len(rows), max(p.top_k for p in chosen),
                              any(p.top_p < 1.0 for p in chosen))


@dataclass(frozen=True)
class StagedSampling:
    """SampledRows waiting for the step's one host->device copy."""

    longs: int  # buffer handle: rows, then top_k
    floats: int  # buffer handle: temperature, top_p, uniform
    count: int
    max_top_k: int
    any_top_p: bool

    def on_device(self, sent: list[torch.Tensor]) -> SampledRows:
        longs, floats, n = sent[self.longs], sent[self.floats], self.count
        return SampledRows(longs[:n], floats[:n, None], longs[n:], floats[n : 2 * n, None], floats[2 * n :],
                           self.max_top_k, self.any_top_p)


def sample(logits: torch.Tensor, sampled: SampledRows) -> torch.Tensor:
    """logits [rows, vocab] -> [sampled] long token ids, one per sampling row."""
    scores = logits.index_select(0, sampled.rows).float() / sampled.temperature  # [sampled, vocab]
    vocab = scores.shape[-1]
    order = None
    if sampled.any_top_p:
        # Nucleus sampling works in sorted order: the first top_k tokens where top_k is set,
        # then the smallest prefix whose mass reaches top_p (always at least one token).
        scores, order = torch.sort(scores, dim=-1, descending=True)
        if sampled.max_top_k:
            ranks = torch.arange(vocab, device=scores.device)
            limit = torch.where(sampled.top_k > 0, sampled.top_k, vocab)
            scores = scores.masked_fill(ranks[None] >= limit[:, None], float("-inf"))
        probs = scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        scores = scores.masked_fill((mass_before >= sampled.top_p) & (sampled.top_p < 1.0), float("-inf"))
    elif sampled.max_top_k:
        # Without top-p, top-k is a threshold at each row's k-th largest score (ties kept).
        largest = torch.topk(scores, min(sampled.max_top_k, vocab), dim=-1).values  # [sampled, max_k]
        kth = largest.gather(-1, sampled.top_k.clamp(1, largest.shape[-1])[:, None] - 1)  # [sampled, 1]
        kth = kth.masked_fill(sampled.top_k[:, None] == 0, float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    cdf = scores.softmax(-1).cumsum(-1)  # [sampled, vocab]
    # Inverse CDF: the first token whose cumulative mass exceeds u * total. Kept strictly
    # below the total, so the token found always has mass (never a masked one at the end).
    total = cdf[:, -1:]
    target = torch.minimum(sampled.uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)  # [sampled, 1]
    if order is not None:
        index = order.gather(-1, index)
    return index.squeeze(-1)


def choose_tokens(logits: torch.Tensor, sampled: SampledRows | None) -> torch.Tensor:
    """logits [rows, vocab] -> [rows] long on the logits' device: argmax, or a sample for
    the rows in `sampled`."""
    chosen = logits.argmax(dim=-1)
    if sampled is not None:
        chosen.index_copy_(0, sampled.rows, sample(logits, sampled))
    return chosen


class Detokenizer:
    """Turns a growing token list into text deltas, holding back what a stop string might
    still claim.

    Incremental (the offsets scheme of TGI and vLLM): each push decodes only a window of the
    last few tokens twice, `ids[prefix:read]` (already emitted) and `ids[prefix:]`, and the
    new text is what the second adds to the first; the window starts a few tokens back so that
    merges and leading spaces decode as they do in the full text. A window ending in U+FFFD
    (half of a multi-byte character) waits for the next token. The cost per token is constant,
    not the length of the answer so far.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's first token
        self.read_offset = 0  # tokens before this are in `text`
        self.text = ""  # decoded so far
        self.emitted = 0  # characters of `text` already returned

    def push(self, token_id: int | None) -> tuple[str, bool]:
        """Add one token (None: only re-check) -> (new text to emit, whether a stop string ended the text)."""
        if token_id is not None:
            self.ids.append(token_id)
            self._decode_new()
        search_from = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self.holdback), False

    def _decode_new(self) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def flush(self) -> str:
        """Everything left, including an incomplete character at the very end."""
        if self.read_offset < len(self.ids):
            decode = self.tokenizer.decode
            before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
            after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
            self.text += after[len(before) :]
            self.prefix_offset = self.read_offset = len(self.ids)
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
