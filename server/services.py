"""Services: everything the app builds at start, held on app.state.

Boot runs in the background so /healthz answers while the base loads; /readyz turns 200
only after the base is loaded, the store scanned and one warm-up generation has run. A
failed boot sets `boot_failed`, on which `adaptserve serve` exits non-zero with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adapters.bases import resolve_base
from adapters.archive import ADAPTER_FILES
from adapters.manifest import MANIFEST_FILE, AdapterManifest
from adapters.store import AdapterStore, LocalStore
from adapters.validate import AdapterLimits
from server.config import Settings
from server.contract import Engine, EngineInfo, GenerationRequest, SamplingParams
from server.inference import InferenceService
from server.metrics import Metrics
from server.registry import DeviceTier, Registry
from server.routing import RouteTable, load_routes_file
from server.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Builds the engine from settings; blocking (loads weights). Tests pass one for tiny models.
EngineFactory = Callable[[Settings], Engine]

EXAMPLE_ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters" / "examples"


def default_engine_factory(settings: Settings) -> Engine:
    # The base first: a missing folder or package fails within a second, not after the
    # engine's imports (torch, transformers: 5-15 s); the engine then finds it resolved.
    resolve_base(settings.base_model, settings.cache_dir / "bases")
    from server.engine.factory import build_engine  # torch stays out of the API's imports

    return build_engine(settings)


def open_store(settings: Settings) -> AdapterStore:
    """Object storage when `adapters_store` is set (read through a local disk cache), else `adapters_dir`."""
    if settings.adapters_store is None:
        return LocalStore(settings.adapters_dir)
    from adapters.s3_store import S3Store, parse_s3_url  # boto3 is imported only for an S3 store
    from adapters.version_cache import VersionCache

    bucket, prefix = parse_s3_url(settings.adapters_store)
    cache_dir = settings.store_cache_dir or settings.cache_dir / "adapter-store" / bucket / prefix
    return S3Store(settings.adapters_store, VersionCache(cache_dir, settings.store_cache_bytes))


@dataclass
class Services:
    settings: Settings
    metrics: Metrics = field(init=False)
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    registry: Registry | None = None
    inference: InferenceService | None = None
    routes: RouteTable | None = None
    watchers: list[asyncio.Task] = field(default_factory=list)  # rescan the store so replicas converge
    ready: bool = False
    draining: bool = False
    boot_error: str | None = None
    boot_failed: asyncio.Event = field(default_factory=asyncio.Event)  # the CLI exits on it
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.settings.metrics_adapter_labels)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    async def boot(self, engine_factory: EngineFactory) -> None:
        try:
            self.engine = await asyncio.to_thread(engine_factory, self.settings)
            signature = self.engine.signature
            limits = AdapterLimits(max_rank=self.settings.max_lora_rank)
            store = open_store(self.settings)
            # Before anything reads the store: debris of a process killed mid-upload goes first
            # (and an object store that cannot be reached stops the start here, saying why).
            await asyncio.to_thread(store.cleanup)
            self.registry = Registry(
                store, signature, limits, cpu_budget_bytes=self.settings.cpu_cache_bytes, metrics=self.metrics,
            )
            if self.settings.install_example_adapters:
                await install_example_adapters(self.registry, signature.canonical_id)
            self.routes = RouteTable(store)
            await asyncio.to_thread(self.routes.reload)
            if self.settings.routes_file is not None:
                # A bad file stops the start: better than serving with routes silently missing.
                await asyncio.to_thread(self.routes.put_many, load_routes_file(self.settings.routes_file))
            self.scheduler = Scheduler(self.engine, self.settings.max_queue)
            self.scheduler.start()
            # The device tier first, so the first scan already warms pinned adapters into slots.
            self.registry.device = DeviceTier(self.engine, self.scheduler)
            await self.registry.refresh()
            interval = self.settings.store_poll_interval_s
            self.watchers = [asyncio.create_task(self.registry.watch(interval)),
                             asyncio.create_task(self.routes.watch(interval))]
            self.inference = InferenceService(
                self.settings, self.engine.info, self.engine, self.registry, self.scheduler, self.metrics,
                routes=self.routes,
            )
            await self._warm_up()
        except Exception as exc:
            self.boot_error = f"{type(exc).__name__}: {exc}"
            logger.exception("start-up failed")
            self.boot_failed.set()
            raise
        self.ready = True
        logger.info("ready in %.1f s: base %s, %d adapters", time.monotonic() - self.started_at,
                    self.engine.info.base_id, len(self.registry.entries))

    async def _warm_up(self) -> None:
        """One tiny generation so the first user request doesn't pay for lazy init."""
        if self.engine.info.kind != "decoder":
            return
        prompt_ids = await asyncio.to_thread(self.engine.tokenize, "Hello", None)
        request = GenerationRequest(self.scheduler.new_request_id(), tuple(prompt_ids), SamplingParams(max_new_tokens=2))
        async for _ in self.scheduler.generate(request):
            pass

    def shutdown(self) -> None:
        for watcher in self.watchers:
            watcher.cancel()
        if self.scheduler is not None:
            self.scheduler.stop()

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.rebalance_adapter_labels()
        if self.engine is None:
            return
        # The engine loads adapters into slots as requests are admitted: its counts since the
        # last scrape, and the tier gauges from its current slots.
        activity = self.engine.take_device_tier_activity()
        m.adapter_cache_hits.labels("device").inc(activity.hits)
        m.adapter_cache_misses.labels("device").inc(activity.misses)
        m.adapter_cache_evictions.labels("device").inc(activity.evictions)
        for seconds in activity.load_seconds:
            m.adapter_load_seconds.labels("device").observe(seconds)
        if self.registry is not None:
            m.adapters_registered.set(len(self.registry.entries))
            m.adapters_rejected.set(len(self.registry.rejected))
            self.registry.export_gauges()
        stats = self.engine.stats()
        for part, nbytes in stats.get("memory_bytes", {}).items():
            m.engine_memory_bytes.labels(part).set(nbytes)
        base = self.engine.info.base_id
        m.queue_depth.set(stats.get("waiting", 0))
        m.running_rows.set(stats.get("running", 0))
        m.vllm_waiting.labels(base).set(stats.get("waiting", 0))
        m.vllm_running.labels(base).set(stats.get("running", 0))
        capacity = stats.get("kv_capacity_tokens") or 1
        m.vllm_kv_usage.labels(base).set(stats.get("kv_tokens", 0) / capacity)
        m.set_lora_info(
            self.engine.info.max_device_adapters,
            stats.get("running_adapters", []),
            stats.get("waiting_adapters", []),
        )


async def install_example_adapters(registry: Registry, base_id: str) -> None:
    """Publish the shipped example adapters made for this base into a store that lacks them.

    Through the registry like an upload (validated, content-addressed), so it works on
    every store, and replicas starting together publish one identical version.
    """
    if not EXAMPLE_ADAPTERS_DIR.is_dir():
        return
    stored = await asyncio.to_thread(registry.store.snapshot)
    for source in sorted(p for p in EXAMPLE_ADAPTERS_DIR.iterdir() if (p / MANIFEST_FILE).is_file()):
        manifest = AdapterManifest.from_dict(json.loads((source / MANIFEST_FILE).read_text()))
        if manifest.base_model != base_id or source.name in stored:
            continue
        with registry.store.staging() as staging:
            # What an upload may carry (config.json: an HF classifier's labels); not the reports.
            for filename in ADAPTER_FILES:
                if (source / filename).is_file():
                    shutil.copyfile(source / filename, staging / filename)
            version, _ = await registry.publish(source.name, staging)
        logger.info("installed example adapter %s into the store", version.manifest.ref)
