"""Adapter registry: name -> versions -> tier. The only writer of adapter state.

The store (a directory possibly shared by replicas, or object storage) is the source of
truth for which versions exist, which one is current and what is pinned; this process
mirrors it by rescanning every `store_poll_interval_s`, so changes made through any
replica converge here. On top it keeps two memory tiers, each LRU under a byte budget,
pinned adapters exempt:

    stored --(store.open_version + validate, worker thread)--> cpu --(copy into a slot, engine thread)--> device

The cpu tier is this registry's; the device tier is the engine's slot pool, which loads an
adapter when a request using it is admitted and applies the device budget itself (the
registry pins, warms and drops there, through DeviceTier).

While the store cannot be reached, the mirror keeps its last state: versions in a memory
tier (or in an object store's local disk cache) keep serving, the rest answer 503
`adapter_store_unavailable`.

Versions are content-addressed (sha256 of config + weights) and a binding holds its
package, so a request keeps the exact bytes it started with while a new version, a
rollback or a delete changes what later requests get. Registry state is mutated only on
the event loop; file IO and validation run in worker threads.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from adapters.manifest import AdapterManifest
from adapters.package import AdapterInvalid, AdapterPackage
from adapters.signature import BaseSignature
from adapters.store import AdapterStore, StoredAdapter, StoredVersion, StoreError, StoreUnavailable, VersionCorrupt
from adapters.validate import AdapterLimits, load_adapter_dir
from server.contract import AdapterBinding, Engine
from server.errors import (
    AdapterConflict,
    AdapterLoadFailed,
    AdapterNotFound,
    AdapterRejected,
    AdapterStoreUnavailable,
    AdapterVersionNotFound,
    is_out_of_memory,
)
from server.metrics import Metrics
from server.scheduler import Scheduler

logger = logging.getLogger(__name__)


class AdapterTier(str, enum.Enum):
    STORED = "stored"  # on disk only
    CPU = "cpu"  # validated tensors in host memory
    DEVICE = "device"  # copied into an engine slot


@dataclass
class AdapterVersion:
    manifest: AdapterManifest
    stored: StoredVersion  # what the store hands to open_version
    package: AdapterPackage | None = None  # present while in the CPU tier
    warnings: tuple[str, ...] = ()
    requests: int = 0
    last_used: float | None = None

    @property
    def key(self) -> str:
        return self.manifest.sha256

    @property
    def directory(self) -> Path:
        return self.stored.directory

    @property
    def nbytes(self) -> int:
        return self.package.nbytes if self.package is not None else self.manifest.size_bytes


@dataclass
class AdapterEntry:
    name: str
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    current: str | None = None
    pinned: bool = False


@dataclass(frozen=True)
class RejectedAdapter:
    name: str
    directory: Path
    problems: tuple[str, ...]
    version: str = ""


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`name` or `name@version`."""
    name, _, version = ref.partition("@")
    return name, version or None


class DeviceTier:
    """The engine's slot pool as the registry sees it; every call runs on the engine thread."""

    def __init__(self, engine: Engine, scheduler: Scheduler):
        self.engine = engine
        self.scheduler = scheduler

    def resident(self) -> list[str]:
        # The engine's own snapshot: readable from the event loop without a round trip.
        return list(self.engine.stats().get("resident_adapter_keys", []))

    async def load(self, binding: AdapterBinding) -> bool:
        try:
            await self.scheduler.call(lambda: self.engine.load_adapter(binding))
        except Exception as exc:
            if is_out_of_memory(exc):
                # Admission would only fail the same way: this request gets the answer now.
                raise AdapterLoadFailed(f"adapter {binding.name}@{binding.version} does not fit in device "
                                        f"memory ({type(exc).__name__}); retry later", param="adapter",
                                        headers={"Retry-After": "5"}) from exc
            # Every slot busy (or a failed copy): admission loads it again later and either
            # waits for a slot or fails that request, so nothing is lost by deferring here.
            logger.info("device load of %s@%s deferred to admission: %s", binding.name, binding.version, exc)
            return False
        return True

    async def evict(self, key: str) -> bool:
        """False when a running row still uses it (the engine keeps it until the row ends)."""

        def evict() -> bool:
            self.engine.evict_adapter(key)
            return key not in self.engine.resident_adapters()

        return await self.scheduler.call(evict)

    async def hold(self, key: str, held: bool) -> bool:
        return await self.scheduler.call(lambda: self.engine.hold_adapter(key, held))


class Registry:
    def __init__(
        self,
        store: AdapterStore,
        signature: BaseSignature,
        limits: AdapterLimits,
        *,
        cpu_budget_bytes: int,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.signature = signature
        self.limits = limits
        self.cpu_budget_bytes = cpu_budget_bytes
        self.metrics = metrics or Metrics()
        self.device: DeviceTier | None = None  # attached once the scheduler runs
        self.entries: dict[str, AdapterEntry] = {}
        self.rejected: dict[str, RejectedAdapter] = {}
        self._rejected_versions: set[tuple[str, str]] = set()
        self._held: set[str] = set()  # device keys the engine holds for a pin
        self._loading: dict[str, asyncio.Task[AdapterPackage]] = {}
        self._refresh_lock = asyncio.Lock()
        self._enforce_lock = asyncio.Lock()

    # --- mirroring the store ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Bring this process's view in line with the store, then apply the budgets and pins."""
        async with self._refresh_lock:
            snapshot = await self._store_call(self.store.snapshot)
            validated: dict[tuple[str, str], AdapterPackage] = {}
            for stored in snapshot.values():
                for version in stored.versions.values():
                    if self._known(stored.name, version.version):
                        continue
                    if version.manifest is None:
                        # A hand-dropped folder: validated now, so a bad one is reported at once.
                        package = await asyncio.to_thread(self._validate_folder, version)
                        if package is not None:
                            validated[(stored.name, version.version)] = package
                    elif version.manifest.base_fingerprint != self.signature.fingerprint:
                        self._reject(version, [
                            f"stored for a base with fingerprint {version.manifest.base_fingerprint}, "
                            f"this server's base is {self.signature.fingerprint}"
                        ])
            self._apply(snapshot, validated)
        await self._enforce()

    def _known(self, name: str, version: str) -> bool:
        entry = self.entries.get(name)
        return (entry is not None and version in entry.versions) or (name, version) in self._rejected_versions

    def _validate_folder(self, version: StoredVersion) -> AdapterPackage | None:
        try:
            with self.store.open_version(version) as directory:
                package = load_adapter_dir(directory, version.name, self.signature, self.limits)
        except AdapterInvalid as exc:
            self._reject(version, exc.problems)
            return None
        for warning in package.warnings:
            logger.warning("adapter %s: %s", version.name, warning)
        return package

    def _reject(self, version: StoredVersion, problems: list[str]) -> None:
        # Folders keep their name as key; store versions are told apart by version.
        key = version.name if version.manifest is None else f"{version.name}@{version.version}"
        self.rejected[key] = RejectedAdapter(version.name, version.directory, tuple(problems), version.version)
        self._rejected_versions.add((version.name, version.version))
        logger.warning("adapter %s skipped: %s", key, "; ".join(problems))

    def _apply(self, snapshot: dict[str, StoredAdapter], validated: dict[tuple[str, str], AdapterPackage]) -> None:
        for name in list(self.entries):
            if name not in snapshot:
                del self.entries[name]
                logger.info("adapter %s removed", name)
        self._rejected_versions &= {(n, v) for n, s in snapshot.items() for v in s.versions}
        self.rejected = {k: r for k, r in self.rejected.items() if (r.name, r.version) in self._rejected_versions}
        for name, stored in snapshot.items():
            entry = self.entries.get(name) or AdapterEntry(name)
            for version in list(entry.versions):
                if version not in stored.versions:
                    del entry.versions[version]
                    logger.info("adapter %s@%s removed", name, version)
            for version, item in stored.versions.items():
                if version in entry.versions or (name, version) in self._rejected_versions:
                    continue
                package = validated.get((name, version))
                manifest = package.manifest if package is not None else item.manifest
                entry.versions[version] = AdapterVersion(manifest, item, package, package.warnings if package else ())
                logger.info("adapter %s registered (%s, r=%d)", manifest.ref, manifest.task, manifest.rank)
            if not entry.versions:
                self.entries.pop(name, None)
                continue
            current = stored.current if stored.current in entry.versions else None
            if current is None:
                current = max(entry.versions.values(), key=lambda v: v.manifest.created_at or 0).manifest.version
            if entry.current is not None and entry.current != current:
                logger.info("adapter %s: current version %s -> %s", name, entry.current, current)
            entry.current = current
            entry.pinned = stored.pinned
            self.entries[name] = entry

    async def watch(self, interval_s: float) -> None:
        """Rescan forever; a failed scan (a flaky network volume, an object store outage) is
        logged and retried, and this process keeps serving from its last view meanwhile."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except AdapterStoreUnavailable as exc:
                logger.warning("adapter store rescan failed, retrying: %s", exc.message)
            except Exception:
                logger.exception("adapter store rescan failed; retrying")

    # --- resolving requests ---------------------------------------------------------------

    def lookup(self, ref: str) -> AdapterVersion:
        name, version = parse_ref(ref)
        entry = self.entries.get(name)
        if entry is None or entry.current is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="adapter")
        chosen = entry.versions.get(version or entry.current)
        if chosen is None:
            raise AdapterVersionNotFound(f"adapter {name!r} has no version {version!r}", param="adapter")
        return chosen

    async def bind(self, ref: str) -> AdapterBinding:
        """Resolve `ref` to one immutable version in host memory (the cpu tier). The engine
        copies it into a device slot when the request is admitted, at a step boundary, so a
        request never waits here for the engine thread."""
        chosen = self.lookup(ref)
        was_stored = chosen.package is None
        # Used from the moment it is asked for: an eviction pass that runs while it loads (the
        # store watcher's) must not take the version a request is waiting on as the oldest one.
        chosen.last_used = time.time()
        package = await self._ensure_cpu(chosen)
        chosen.requests += 1
        manifest = package.manifest
        binding = AdapterBinding(manifest.name, manifest.version, manifest.sha256, package)
        if was_stored:
            await self._enforce()
        return binding

    async def _ensure_cpu(self, chosen: AdapterVersion) -> AdapterPackage:
        if chosen.package is not None:
            self.metrics.adapter_cache_hits.labels("cpu").inc()
            return chosen.package
        self.metrics.adapter_cache_misses.labels("cpu").inc()
        key = chosen.key
        task = self._loading.get(key)
        if task is None:
            # One read per version however many requests ask for it at once.
            task = asyncio.create_task(self._load(chosen))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, chosen: AdapterVersion) -> AdapterPackage:
        started = time.monotonic()

        def read() -> AdapterPackage:
            with self.store.open_version(chosen.stored) as directory:
                return load_adapter_dir(directory, chosen.manifest.name, self.signature, self.limits)

        try:
            package = await asyncio.to_thread(read)
        except StoreUnavailable as exc:
            raise AdapterStoreUnavailable(
                f"adapter {chosen.manifest.ref} is not in this replica's memory or disk cache, and the adapter "
                f"store cannot be reached; retry later", details=[str(exc)], param="adapter",
                headers={"Retry-After": "5"}) from exc
        except VersionCorrupt as exc:
            raise AdapterRejected(f"stored adapter {chosen.manifest.ref} does not match its content hash",
                                  details=[str(exc)], param="adapter") from exc
        except AdapterInvalid as exc:
            raise AdapterRejected(
                f"stored adapter {chosen.manifest.ref} failed validation", details=exc.problems, param="adapter"
            ) from exc
        except FileNotFoundError as exc:
            raise AdapterNotFound(f"adapter {chosen.manifest.ref} was deleted", param="adapter") from exc
        except MemoryError as exc:
            raise AdapterLoadFailed(f"adapter {chosen.manifest.ref} does not fit in host memory; retry later",
                                    param="adapter", headers={"Retry-After": "5"}) from exc
        if package.key != chosen.key:
            raise AdapterRejected(f"stored adapter {chosen.manifest.ref} does not match its content hash",
                                  param="adapter")
        self.metrics.adapter_load_seconds.labels("cpu").observe(time.monotonic() - started)
        chosen.package = package
        return package

    async def _ensure_device(self, binding: AdapterBinding) -> None:
        """Copies the adapter into a slot unless it is there (the engine counts its device
        tier's hits, misses and load times itself)."""
        if self.device is not None and binding.key not in self.device.resident():
            await self.device.load(binding)

    # --- budgets and pins -------------------------------------------------------------------

    def _versions(self) -> list[tuple[AdapterEntry, AdapterVersion]]:
        return [(e, v) for e in self.entries.values() for v in e.versions.values()]

    def _pinned_keys(self) -> set[str]:
        return {e.versions[e.current].key for e in self.entries.values() if e.pinned and e.current in e.versions}

    async def _enforce(self) -> None:
        """Warm pinned adapters, then evict least recently used ones past each tier's budget."""
        for entry in list(self.entries.values()):
            version = entry.versions.get(entry.current) if entry.pinned else None
            if version is not None and (version.package is None or self._not_resident(version.key)):
                await self._warm(version)  # idempotent, so safe outside the lock
        # One pass at a time: two interleaved passes would both pin-hold the same slot.
        async with self._enforce_lock:
            await self._evict()

    async def _evict(self) -> None:
        pinned = self._pinned_keys()
        by_lru = sorted(self._versions(), key=lambda ev: ev[1].last_used or 0.0)
        cpu = [v for _, v in by_lru if v.package is not None]
        total = sum(v.package.nbytes for v in cpu)
        for version in cpu:
            if total <= self.cpu_budget_bytes:
                break
            if version.key in pinned:
                continue
            total -= version.package.nbytes
            # In-flight bindings still hold the package; memory is freed when they finish.
            version.package = None
            self.metrics.adapter_cache_evictions.labels("cpu").inc()
            logger.info("adapter %s left the cpu tier", version.manifest.ref)

        if self.device is not None:
            await self._enforce_device(by_lru, pinned)
        self.export_gauges()

    def _not_resident(self, key: str) -> bool:
        return self.device is not None and key not in self.device.resident()

    async def _warm(self, version: AdapterVersion) -> None:
        """Best effort: the answer (or the listing) shows the tier it reached."""
        try:
            package = await self._ensure_cpu(version)
            manifest = package.manifest
            await self._ensure_device(AdapterBinding(manifest.name, manifest.version, manifest.sha256, package))
        except (AdapterRejected, AdapterNotFound, AdapterLoadFailed, AdapterStoreUnavailable):
            logger.exception("adapter %s cannot be warmed", version.manifest.ref)

    async def _enforce_device(self, by_lru: list[tuple[AdapterEntry, AdapterVersion]], pinned: set[str]) -> None:
        resident = set(self.device.resident())
        for key in self._held - pinned:
            await self.device.hold(key, False)
            self._held.discard(key)
        for key in (pinned & resident) - self._held:
            if await self.device.hold(key, True):
                self._held.add(key)
        known = {v.key: v for _, v in by_lru}
        # Slots of deleted versions: freed now (the engine keeps any a running row still uses).
        for key in resident - known.keys():
            if await self.device.evict(key):
                self.metrics.adapter_cache_evictions.labels("device").inc()

    def resident_keys(self) -> set[str]:
        """One snapshot of the device's adapter keys, for callers that ask for many versions' tiers."""
        return set(self.device.resident()) if self.device is not None else set()

    def tier(self, version: AdapterVersion, resident: Collection[str] | None = None) -> AdapterTier:
        """`resident`: resident_keys(), when the caller asks for many versions at once."""
        if resident is None:
            resident = self.resident_keys()
        if version.key in resident:
            return AdapterTier.DEVICE
        return AdapterTier.CPU if version.package is not None else AdapterTier.STORED

    def export_gauges(self) -> None:
        m = self.metrics
        counts = {tier: 0 for tier in AdapterTier}
        sizes = {tier: 0 for tier in AdapterTier}
        m.lora_adapter_loaded.clear()
        resident = self.resident_keys()  # one snapshot, not one per version
        for entry, version in self._versions():
            tier = self.tier(version, resident)
            counts[AdapterTier.STORED] += 1
            sizes[AdapterTier.STORED] += version.manifest.size_bytes
            if version.package is not None:
                counts[AdapterTier.CPU] += 1
                sizes[AdapterTier.CPU] += version.package.nbytes
                m.lora_adapter_loaded.labels(version.manifest.name, "cpu", str(entry.pinned).lower()).set(1)
            if tier is AdapterTier.DEVICE:
                counts[tier] += 1
                sizes[tier] += version.nbytes
                m.lora_adapter_loaded.labels(version.manifest.name, "gpu", str(entry.pinned).lower()).set(1)
        for tier in AdapterTier:
            m.adapters_resident.labels(tier.value).set(counts[tier])
            m.adapter_resident_bytes.labels(tier.value).set(sizes[tier])

    # --- management (the HTTP admin surface calls these) ------------------------------------

    def entry(self, name: str) -> AdapterEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return entry

    async def check(self, name: str, staged: Path) -> list[str]:
        """Every validation problem of a staged candidate (empty = it would be accepted)."""
        try:
            await asyncio.to_thread(load_adapter_dir, staged, name, self.signature, self.limits)
        except AdapterInvalid as exc:
            return exc.problems
        return []

    async def publish(self, name: str, staged: Path) -> tuple[AdapterVersion, bool]:
        """Validate a staged candidate, store it as a version and make it current.

        Returns the version and whether it is new (False: identical bytes were stored before).
        """
        try:
            package = await asyncio.to_thread(load_adapter_dir, staged, name, self.signature, self.limits)
        except AdapterInvalid as exc:
            raise AdapterRejected(f"adapter {name!r} is invalid", details=exc.problems) from exc
        manifest = AdapterManifest.from_dict({**package.manifest.to_dict(), "created_at": time.time()})
        result = await self._store_call(self.store.put, name, staged, manifest)
        await self.refresh()
        version = self.entry(name).versions[result.version.version]
        if version.package is None:
            # Just validated: keep it warm so the first request does not read it again.
            version.package = AdapterPackage(version.manifest, version.directory, package.modules,
                                             package.head, package.warnings)
            await self._enforce()
        return version, result.created

    async def set_current(self, name: str, version: str | None) -> AdapterEntry:
        """Make `version` current; None = the newest version older than the current one."""
        entry = self.entry(name)
        if version is None:
            current = entry.versions[entry.current]
            older = [v for v in entry.versions.values()
                     if (v.manifest.created_at or 0) < (current.manifest.created_at or 0)]
            if not older:
                raise AdapterConflict(f"adapter {name!r} has no version older than {entry.current}")
            version = max(older, key=lambda v: v.manifest.created_at or 0).manifest.version
        if version not in entry.versions:
            raise AdapterVersionNotFound(f"adapter {name!r} has no version {version!r}")
        await self._store_call(self.store.set_current, name, version)
        await self.refresh()
        return self.entry(name)

    async def delete(self, name: str, version: str | None) -> None:
        entry = self.entry(name)
        if version is not None and version not in entry.versions:
            raise AdapterVersionNotFound(f"adapter {name!r} has no version {version!r}")
        await self._store_call(self.store.delete, name, version)
        await self.refresh()

    async def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        self.entry(name)
        await self._store_call(self.store.set_pinned, name, pinned)
        await self.refresh()
        return self.entry(name)

    async def load(self, name: str, version: str | None) -> AdapterVersion:
        """Warm one version on this replica (cpu, then device when the engine runs)."""
        chosen = self.lookup(f"{name}@{version}" if version else name)
        chosen.last_used = time.time()
        await self._warm(chosen)
        await self._enforce()
        return chosen

    async def unload(self, name: str) -> AdapterEntry:
        """Drop every version of `name` from this replica's memory tiers (it stays stored)."""
        entry = self.entry(name)
        if entry.pinned:
            raise AdapterConflict(f"adapter {name!r} is pinned; unpin it first")
        for version in entry.versions.values():
            if self.device is not None and version.key in self.device.resident():
                if await self.device.evict(version.key):
                    self.metrics.adapter_cache_evictions.labels("device").inc()
            if version.package is not None:
                version.package = None
                self.metrics.adapter_cache_evictions.labels("cpu").inc()
        self.export_gauges()
        return entry

    async def _store_call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError as exc:
            # Another replica changed the store between our lookup and this call.
            raise AdapterConflict(str(exc)) from exc
        except StoreUnavailable as exc:
            raise AdapterStoreUnavailable(str(exc), headers={"Retry-After": "5"}) from exc
