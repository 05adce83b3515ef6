"""Log-probabilities of chosen and prompt tokens, from the logits the sampler reads.

They are the log-softmax of the adapter's logits in float32, before temperature, top-k or
top-p (what OpenAI and vLLM report): `log p(token | everything before it)`. Only rows whose
request asked are computed, and each batch of them comes back to the host in one read.
"""

from __future__ import annotations

import torch

from server.contract import TokenLogprob


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [n, vocab] (any dtype), token_ids [n] long -> each token's logprob and the `top`
    most likely tokens at its position."""
    if not len(token_ids):
        return []
    logprobs = logits.float().log_softmax(-1)  # [n, vocab]
    chosen = logprobs.gather(-1, token_ids[:, None])  # [n, 1]
    k = min(top, logprobs.shape[-1])
    if k:
        best = logprobs.topk(k, dim=-1)  # values, indices: [n, k]
        packed = torch.cat([token_ids[:, None].double(), chosen.double(), best.indices.double(),
                            best.values.double()], dim=-1)
    else:
        packed = torch.cat([token_ids[:, None].double(), chosen.double()], dim=-1)
    rows = packed.tolist()  # one read; ids are exact in float64
    result = []
    for row in rows:
        ids, values = row[2 : 2 + k], row[2 + k :]
        result.append(TokenLogprob(int(row[0]), row[1], tuple((int(i), v) for i, v in zip(ids, values))))
    return result
