"""Automatic prefix caching: the KV of prompt prefixes kept across requests, per adapter version.

Prompts are cut into blocks of BLOCK_TOKENS tokens. Block i is named by a chain hash,
key(i) = H(key(i-1) | tokens of block i), starting from H(root), where root is the
adapter's content key ("" for the base): a LoRA changes the hidden states of every layer
after its first adapted one, so KV computed under one adapter is wrong under another, and a
new version under the same name has a new content hash, so it can never hit an old entry
(vLLM's automatic prefix caching names blocks the same way; vLLM #42125 was a cache keyed
by adapter name). A lookup walks the chain from the root and stops at the first block not
cached; only a prompt's full blocks are cached, and at least its last token is computed
(its logits are needed).

Storage, per attention layer: K and V pools [kv_heads, capacity, BLOCK_TOKENS, head_dim],
grown by doubling up to the byte budget. A hit is copied into the request's own row of the
KV slab inside attention, layer by layer, during the forward that prefills the rest of its
prompt; new full blocks are copied out of the slab in the same forward. So a running row
never references the cache, and evicting or clearing it between steps can never corrupt
one. Blocks used or written by the step in flight are pinned until it ends; a step that
fails releases what it reserved.

Eviction is least recently used among leaves (blocks no other cached block extends), so
every cached block's parent is cached too and a lookup never finds a chain with a hole.
Under memory pressure the engine clears the cache before it refuses any running row.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

BLOCK_TOKENS = 16


def block_keys(root: str, tokens: Sequence[int], blocks: int) -> list[bytes]:
    """Chain hashes of the first `blocks` full blocks of `tokens`."""
    keys, parent = [], hashlib.blake2b(root.encode(), digest_size=16).digest()
    array = np.asarray(tokens[: blocks * BLOCK_TOKENS], dtype=np.int64)
    for block in range(blocks):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array[block * BLOCK_TOKENS : (block + 1) * BLOCK_TOKENS].tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys


@dataclass
class _Block:
    index: int  # position in the layer pools
    parent: bytes | None
    children: int = 0
    ready: bool = False  # written by a finished step


@dataclass(frozen=True)
class PrefixMatch:
    keys: tuple[bytes, ...]  # chain hash of each full block of the prompt
    hits: int  # leading blocks that are cached and usable

    @property
    def cached_tokens(self) -> int:
        return self.hits * BLOCK_TOKENS


@dataclass(frozen=True)
class PrefixPlan:
    """One prompt's use of the cache in a step."""

    cached_tokens: int  # leading tokens read from the cache (a multiple of BLOCK_TOKENS)
    read: tuple[int, ...]  # pool indices of those blocks, in order
    write_from: int  # first block of the prompt written to the cache by this step
    write: tuple[int, ...]  # pool indices for blocks write_from, write_from + 1, ...


@dataclass
class PrefixCache:
    budget_bytes: int
    bytes_per_block: int  # every layer's K and V for BLOCK_TOKENS tokens
    blocks: dict[bytes, _Block] = field(default_factory=dict)
    lru: collections.OrderedDict[bytes, None] = field(default_factory=collections.OrderedDict)
    free: list[int] = field(default_factory=list)
    capacity: int = 0  # pool rows the layers grow to (each layer lazily)
    pinned: set[bytes] = field(default_factory=set)  # read or written by the step in flight
    pending: list[bytes] = field(default_factory=list)  # reserved by the step in flight
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [kv_heads, capacity, block, dim]
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def limit(self) -> int:
        """Blocks the budget holds."""
        return self.budget_bytes // self.bytes_per_block if self.bytes_per_block else 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    # --- the engine's side (host only) ---------------------------------------------------

    def match(self, root: str, tokens: Sequence[int], keys: Sequence[bytes] | None = None) -> PrefixMatch:
        """How much of `tokens` under `root` is cached (changes nothing). `keys`: what an
        earlier match of the same root and tokens returned, so a waiting prompt is hashed once."""
        full = len(tokens) // BLOCK_TOKENS
        if not self.enabled or not full:
            return PrefixMatch((), 0)
        if keys is None:
            keys = block_keys(root, tokens, full)
        usable = (len(tokens) - 1) // BLOCK_TOKENS  # the last token is always computed
        hits = 0
        while hits < usable and (block := self.blocks.get(keys[hits])) is not None and block.ready:
            hits += 1
        return PrefixMatch(tuple(keys), hits)

    def plan(self, match: PrefixMatch) -> PrefixPlan:
        """Use `match` in this step: pin its hits and reserve room for the prompt's other
        full blocks (as many as fit, in order)."""
        read = []
        for key in match.keys[: match.hits]:
            block = self.blocks.get(key)
            if block is None or not block.ready:  # cleared since the match (memory pressure)
                break
            read.append(block.index)
            self.lru.move_to_end(key)
            self.pinned.add(key)
        hits = len(read)
        write = []
        for position in range(hits, len(match.keys)):
            key = match.keys[position]
            if key in self.blocks:  # another prompt of this step writes it
                break
            index = self._allocate()
            if index is None:
                break
            parent = match.keys[position - 1] if position else None
            self.blocks[key] = _Block(index, parent)
            if parent is not None:
                self.blocks[parent].children += 1
            self.pinned.add(key)
            self.pending.append(key)
            write.append(index)
        return PrefixPlan(hits * BLOCK_TOKENS, tuple(read), hits, tuple(write))

    def _allocate(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.capacity < self.limit:
            # Grow in doubling steps; the layer pools follow on their next write.
            start, self.capacity = self.capacity, min(self.limit, max(16, 2 * self.capacity))
            self.free = list(range(self.capacity - 1, start, -1))
            return start
        return self._evict_one()

    def _evict_one(self) -> int | None:
        for key in self.lru:
            block = self.blocks[key]
            if block.children == 0 and key not in self.pinned:
                self._drop(key)
                return block.index
        return None

    def _drop(self, key: bytes) -> None:
        block = self.blocks.pop(key)
        self.lru.pop(key, None)
        if block.parent is not None and block.parent in self.blocks:
            self.blocks[block.parent].children -= 1

    def finish_step(self) -> None:
        """The forward ran: blocks it wrote are ready (most recently used)."""
        for key in self.pending:
            if key in self.blocks:
                self.blocks[key].ready = True
                self.lru[key] = None
        self.pending.clear()
        self.pinned.clear()

    def abandon_step(self) -> None:
        """The forward failed: what it reserved goes back, deepest first."""
        for key in reversed(self.pending):
            if key in self.blocks:
                index = self.blocks[key].index
                self._drop(key)
                self.free.append(index)
        self.pending.clear()
        self.pinned.clear()

    def clear(self) -> None:
        """Give every block and its memory back (memory pressure; pinned ones included only
        between steps, which is when the engine calls this)."""
        self.blocks.clear()
        self.lru.clear()
        self.free.clear()
        self.pinned.clear()
        self.pending.clear()
        self.keys.clear()
        self.values.clear()
        self.capacity = 0

    # --- the attention side ------------------------------------------------------------

    def _pools(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """like: [kv_heads, tokens, dim] (a slab row's view)."""
        keys = self.keys.get(layer)
        if keys is None or keys.shape[1] < self.capacity:
            shape = (like.shape[0], self.capacity, BLOCK_TOKENS, like.shape[-1])
            grown_k, grown_v = like.new_zeros(shape), like.new_zeros(shape)
            if keys is not None:
                grown_k[:, : keys.shape[1]] = keys
                grown_v[:, : keys.shape[1]] = self.values[layer]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        return self.keys[layer], self.values[layer]

    def read(self, layer: int, indices: torch.Tensor, out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
        """Copy blocks `indices` into out_*: [kv_heads, len(indices) * BLOCK_TOKENS, dim]."""
        keys, values = self._pools(layer, out_keys)
        heads, dim = out_keys.shape[0], out_keys.shape[-1]
        out_keys.copy_(keys.index_select(1, indices).view(heads, -1, dim))
        out_values.copy_(values.index_select(1, indices).view(heads, -1, dim))

    def write(self, layer: int, indices: torch.Tensor, keys_in: torch.Tensor, values_in: torch.Tensor) -> None:
        """Store keys_in/values_in [kv_heads, len(indices) * BLOCK_TOKENS, dim] as blocks `indices`."""
        keys, values = self._pools(layer, keys_in)
        heads, dim = keys_in.shape[0], keys_in.shape[-1]
        keys.index_copy_(1, indices, keys_in.reshape(heads, -1, BLOCK_TOKENS, dim))
        values.index_copy_(1, indices, values_in.reshape(heads, -1, BLOCK_TOKENS, dim))
