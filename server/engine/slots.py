"""An engine's device slots: which adapter sits where, who holds it, and what loading costs.

Shared by the text engine and the vision engine; each brings its own layers, which copy an
adapter's weights into a slot (`copy_in`) and zero it again (`clear`). Slot 0 is the base
and never holds an adapter. An adapter is held while a running row, a classify batch or a
pin uses it; only unheld ones are evicted, least recently used first, when a slot is needed
or the device byte budget is over. The lowest free slot is taken first, so pools that grow
to the highest slot in use stay small. Everything runs on the engine thread except
`activity.take()`, which the metrics read from the event loop.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from typing import Callable

import torch

from adapters.package import AdapterPackage
from server.contract import AdapterBinding, DeviceTierActivity
from server.errors import AdapterLoadFailed

Head = tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]  # weight [labels, hidden], bias, label names


class NoFreeSlot(Exception):
    """Every device slot holds an adapter that something still uses."""


class DeviceTierCounter:
    """The engine thread counts, a metrics reader takes the counts (under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._load_seconds: list[float] = []

    def count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def loaded(self, seconds: float) -> None:
        with self._lock:
            self._counts["misses"] += 1
            self._load_seconds.append(seconds)

    def take(self) -> DeviceTierActivity:
        with self._lock:
            counts, seconds = self._counts, self._load_seconds
            self._counts, self._load_seconds = collections.Counter(), []
        return DeviceTierActivity(counts["hits"], counts["misses"], counts["evictions"], tuple(seconds))


class AdapterSlots:
    def __init__(self, count: int, device: torch.device, budget_bytes: int | None,
                 copy_in: Callable[[int, AdapterPackage], None], clear: Callable[[int], None],
                 on_change: Callable[[], None] = lambda: None):
        self.count = count
        self.device = device
        self.budget_bytes = budget_bytes  # adapter bytes in slots (None: only the slot count bounds them)
        self._copy_in, self._clear, self._on_change = copy_in, clear, on_change
        self.free = list(range(1, count + 1))  # a heap
        self.by_key: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self.users: collections.Counter[str] = collections.Counter()
        self.nbytes: dict[str, int] = {}
        self.heads: dict[str, Head] = {}  # classifier adapters' heads, float32 on the device
        self.activity = DeviceTierCounter()

    def lookup(self, key: str) -> int | None:
        """The adapter's slot (marking it recently used), or None when it is not resident."""
        slot = self.by_key.get(key)
        if slot is not None:
            self.by_key.move_to_end(key)
        return slot

    def victim(self) -> str | None:
        return next((k for k in self.by_key if self.users[k] == 0), None)

    def load(self, adapter: AdapterBinding) -> int:
        """Slot of `adapter`, copying it in if needed (counted as a hit or a miss)."""
        slot = self.lookup(adapter.key)
        if slot is not None:
            self.activity.count("hits")
            return slot
        started = time.perf_counter()
        package: AdapterPackage = adapter.package
        while not self.free or self._over_budget(package.nbytes):
            victim = self.victim()
            if victim is None:
                if not self.free:
                    raise NoFreeSlot(f"all {self.count} adapter slots hold adapters in use; "
                                     f"{adapter.name}@{adapter.version} must wait for one")
                break  # over the byte budget with every resident adapter in use: load anyway
            self.evict(victim)
            self.activity.count("evictions")
        slot = heapq.heappop(self.free)
        try:
            self._copy_in(slot, package)
            if package.head is not None:
                head = package.head
                bias = head.bias.to(self.device, torch.float32) if head.bias is not None else None
                self.heads[adapter.key] = (head.weight.to(self.device, torch.float32), bias,
                                           package.manifest.labels or ())
        except BaseException:
            # Out of memory halfway through the copy: the slot goes back empty, not lost.
            self._clear(slot)
            heapq.heappush(self.free, slot)
            raise
        self.by_key[adapter.key] = slot
        self.nbytes[adapter.key] = package.nbytes
        self._on_change()
        self.activity.loaded(time.perf_counter() - started)
        return slot

    def _over_budget(self, incoming: int) -> bool:
        budget = self.budget_bytes
        return budget is not None and bool(self.by_key) and sum(self.nbytes.values()) + incoming > budget

    def evict(self, key: str) -> None:
        """Free an adapter's slot, unless something still uses it."""
        slot = self.by_key.get(key)
        if slot is None or self.users[key]:
            return
        self._clear(slot)
        del self.by_key[key]
        self.nbytes.pop(key, None)
        self.heads.pop(key, None)
        heapq.heappush(self.free, slot)
        self._on_change()

    def hold(self, key: str, held: bool) -> bool:
        """Pin a resident adapter (one more user, so eviction passes it by); False when not resident."""
        if key not in self.by_key:
            return False
        self.users[key] += 1 if held else -1
        return True

    def resident(self) -> dict[str, bool]:
        """key -> in use (a running row, a batch or a pin holds it)."""
        return {key: self.users[key] > 0 for key in self.by_key}


class SlotTableEngine:
    """The Engine contract's device-tier methods, answered by an engine's slot table: what the
    text and vision engines share beside the table itself (each sets `self.slots`)."""

    slots: AdapterSlots

    @property
    def device_budget_bytes(self) -> int | None:
        return self.slots.budget_bytes

    @device_budget_bytes.setter
    def device_budget_bytes(self, value: int | None) -> None:
        self.slots.budget_bytes = value

    def take_device_tier_activity(self) -> DeviceTierActivity:
        return self.slots.activity.take()

    def evict_adapter(self, key: str) -> None:
        self.slots.evict(key)

    def hold_adapter(self, key: str, held: bool) -> bool:
        return self.slots.hold(key, held)

    def resident_adapters(self) -> dict[str, bool]:
        return self.slots.resident()

    def slot_without_waiting(self, adapter: AdapterBinding) -> int:
        """The adapter's slot for a classify batch, which has no queue to wait in: with every
        slot held (pinned, or by this batch) the caller is told to retry."""
        try:
            return self.slots.load(adapter)
        except NoFreeSlot as exc:
            raise AdapterLoadFailed(f"all {self.slots.count} adapter slots are held (pinned, or in this batch); "
                                    f"{adapter.name}@{adapter.version} cannot be loaded", param="adapter",
                                    headers={"Retry-After": "5"}) from exc
