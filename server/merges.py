"""Per-request merges: derived adapters built on demand and kept in a small LRU.

A derived adapter is keyed by its recipe, which names every source by content hash
(adapters.merge.recipe_for), so a new version of any source is a different key and a
fresh merge: a stale combination is never served. The binding's key is that recipe hash,
which the engine's slot pool treats like any other adapter's content key.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Sequence

from adapters.merge import MergeError, MergeSource, MergeSpec, merge_adapters, merged_rank, recipe_for, recipe_key
from server.contract import AdapterBinding
from server.errors import InvalidParameter, LimitExceeded


class MergeCache:
    def __init__(self, max_entries: int, max_rank: int):
        self.max_entries = max_entries
        self.max_rank = max_rank
        self.entries: collections.OrderedDict[str, AdapterBinding] = collections.OrderedDict()
        self._building: dict[str, asyncio.Task[AdapterBinding]] = {}
        self.merges = 0  # merges computed (not served from the cache), for tests and logs

    async def get(self, sources: Sequence[tuple[AdapterBinding, float]], spec: MergeSpec) -> AdapterBinding:
        merge_sources = [MergeSource(binding.package, weight) for binding, weight in sources]
        problems = spec.problems()
        if problems:
            raise InvalidParameter("; ".join(problems), param="merge")
        rank = merged_rank(merge_sources, spec)
        if rank > self.max_rank:
            raise LimitExceeded(f"the merged adapter would have rank {rank}; the limit is {self.max_rank}",
                                param="merge.rank")
        key = recipe_key(recipe_for(merge_sources, spec))
        cached = self.entries.get(key)
        if cached is not None:
            self.entries.move_to_end(key)
            return cached
        task = self._building.get(key)
        if task is None:
            # One merge per recipe however many requests ask for it at once.
            task = asyncio.create_task(self._build(key, merge_sources, spec))
            self._building[key] = task
            task.add_done_callback(lambda _: self._building.pop(key, None))
        return await asyncio.shield(task)

    async def _build(self, key: str, sources: list[MergeSource], spec: MergeSpec) -> AdapterBinding:
        name = "+".join(s.package.manifest.name for s in sources)
        try:
            result = await asyncio.to_thread(merge_adapters, name, sources, spec)
        except MergeError as exc:
            raise InvalidParameter(str(exc), param="adapters") from exc
        package = result.package
        binding = AdapterBinding(name, package.manifest.version, key, package)
        self.merges += 1
        self.entries[key] = binding
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return binding
