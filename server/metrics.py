"""Every Prometheus collector, defined once, on a registry owned by the app.

Two families: adaptserve's own (`adaptserve_*`) and the vLLM-named gauges that the
Kubernetes Gateway API Inference Extension's endpoint picker scrapes (`vllm:*`), with
vLLM's names and label semantics so an existing picker or dashboard works unchanged.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
# A copy into a device slot takes about a millisecond on CPU (r=8 on q/v): the buckets start
# below that so a percentile can be read off them; reading from disk takes tens of ms to seconds.
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, *TTFT_BUCKETS)

BASE_LABEL = "__base__"
OTHER_LABEL = "other"
# Adapters that keep their own `adapter` label; the server passes Settings.metrics_adapter_labels.
ADAPTER_LABEL_LIMIT = 20


class AdapterLabels:
    """Bounds the `adapter` label to the top-N adapters by requests; the rest share "other".

    A Space-Saving sketch (4N counters: a newcomer replaces the smallest and inherits its
    count) ranks adapters in bounded memory, so even names that never bind (a typo, a
    scan) cannot grow it. Free label slots go to newcomers at once; `rebalance` (once per
    scrape) hands them to the current top-N, and a demoted adapter's series are removed —
    to Prometheus that is an ordinary counter reset, so rate() stays right. The name
    "other" itself always folds, so the bucket never mixes with a real adapter's series.
    """

    def __init__(self, limit: int = ADAPTER_LABEL_LIMIT):
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.labelled: set[str] = set()

    def label(self, name: str, count: bool = False) -> str:
        if name == BASE_LABEL:
            return name
        if count:
            self._count(name)
        if name in self.labelled:
            return name
        if name != OTHER_LABEL and len(self.labelled) < self.limit:
            self.labelled.add(name)
            return name
        return OTHER_LABEL

    def _count(self, name: str) -> None:
        if name in self.counts or len(self.counts) < 4 * self.limit:
            self.counts[name] = self.counts.get(name, 0) + 1
            return
        smallest = min(self.counts, key=self.counts.__getitem__)
        self.counts[name] = self.counts.pop(smallest) + 1

    def rebalance(self) -> set[str]:
        """Give the label slots to the current top-N; returns the names that lost theirs."""
        ranked = sorted((n for n in self.counts if n != OTHER_LABEL), key=self.counts.__getitem__, reverse=True)
        top = set(ranked[: self.limit])
        demoted = self.labelled - top
        self.labelled = top
        return demoted


class AdapterFolded:
    """A labelled Counter whose `adapter` label always passes through AdapterLabels.

    Wrapping the collector (rather than asking every caller to fold) means no code path
    can export an unbounded label set.
    """

    def __init__(self, collector: Counter, labelnames: list[str], adapters: AdapterLabels, counts: bool = False):
        self.collector = collector
        self.labelnames = labelnames
        self.position = labelnames.index("adapter")
        self.adapters = adapters
        self.counts = counts  # this collector's calls rank adapters (one per request)
        self.issued: set[tuple[str, ...]] = set()

    def labels(self, *values: str, **named: str):
        if named:
            values = tuple(named[name] for name in self.labelnames)
        folded = list(values)
        folded[self.position] = self.adapters.label(str(values[self.position]), self.counts)
        key = tuple(folded)
        self.issued.add(key)
        return self.collector.labels(*key)

    def forget(self, names: set[str]) -> None:
        for key in [k for k in self.issued if k[self.position] in names]:
            self.collector.remove(*key)
            self.issued.discard(key)


class Metrics:
    def __init__(self, adapter_label_limit: int = ADAPTER_LABEL_LIMIT) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.adapter_labels = AdapterLabels(adapter_label_limit)
        self.requests = AdapterFolded(Counter(
            "adaptserve_requests", "Requests by endpoint, adapter (top-N, the rest `other`) and HTTP status.",
            ["endpoint", "adapter", "status"], registry=r,
        ), ["endpoint", "adapter", "status"], self.adapter_labels, counts=True)
        self.request_latency = Histogram(
            "adaptserve_request_latency_seconds", "Time from arrival to the last byte.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "adaptserve_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "adaptserve_queue_time_seconds", "Time a request waited before its prefill.",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = AdapterFolded(Counter(
            "adaptserve_prompt_tokens", "Prompt tokens processed, by adapter (top-N).", ["adapter"], registry=r
        ), ["adapter"], self.adapter_labels)
        self.generated_tokens = AdapterFolded(Counter(
            "adaptserve_generated_tokens", "Tokens generated, by adapter (top-N).", ["adapter"], registry=r
        ), ["adapter"], self.adapter_labels)
        self.adapters_registered = Gauge(
            "adaptserve_adapters_registered", "Adapters (names) registered and servable.", registry=r
        )
        self.adapters_rejected = Gauge(
            "adaptserve_adapters_rejected", "Adapter folders in the store that failed validation.", registry=r
        )
        # Adapter lifecycle: tier = stored (disk) | cpu (host memory) | device (engine slots).
        self.adapter_load_seconds = Histogram(
            "adaptserve_adapter_load_seconds", "Time to bring an adapter into a tier (cpu: read + validate; "
            "device: copy into a slot).", ["tier"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.adapter_cache_hits = Counter(
            "adaptserve_adapter_cache_hits", "Adapter requests that found it already in the tier.", ["tier"], registry=r
        )
        self.adapter_cache_misses = Counter(
            "adaptserve_adapter_cache_misses", "Adapter requests that had to load it into the tier.", ["tier"],
            registry=r,
        )
        self.adapter_cache_evictions = Counter(
            "adaptserve_adapter_cache_evictions", "Adapters evicted from a tier (budget, unload or delete).",
            ["tier"], registry=r,
        )
        self.adapters_resident = Gauge(
            "adaptserve_adapters_resident", "Adapter versions present in each tier.", ["tier"], registry=r
        )
        self.adapter_resident_bytes = Gauge(
            "adaptserve_adapter_resident_bytes", "Adapter bytes held in each tier.", ["tier"], registry=r
        )
        self.adapter_uploads = Counter(
            "adaptserve_adapter_uploads", "Adapter uploads by outcome (created, unchanged, rejected, too_large, "
            "error).", ["outcome"], registry=r,
        )
        # Bounded by the operator's routes: task names and their targets, not caller input.
        self.task_requests = Counter(
            "adaptserve_task_requests", "Requests that named a task, by the adapter that served it (`__base__` "
            "for a base fallback) and how: routed, fallback, or failed (target unavailable, no fallback).",
            ["task", "adapter", "route"], registry=r,
        )
        self.engine_memory_bytes = Gauge(
            "adaptserve_engine_memory_bytes", "Memory the engine allocated beside the base weights: lora_pool "
            "(adapter slots), lora_active (their matmul layout, torch-ops path), kv_cache (the running rows), "
            "prefix_cache.", ["part"], registry=r,
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"], registry=r
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens read from the prefix cache instead of computed.",
            ["model_name"], registry=r,
        )
        self.queue_depth = Gauge("adaptserve_queue_depth", "Requests waiting for a batch row.", registry=r)
        self.running_rows = Gauge("adaptserve_running_rows", "Rows in the running batch.", registry=r)

        # vLLM-compatible gauges (names and labels exactly as vLLM exports them).
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", ["model_name"], registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running.", ["model_name"], registry=r)
        self.vllm_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage, 0..1.", ["model_name"], registry=r
        )
        self.vllm_lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting adapters; the value is the unix time of the update.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self.lora_adapter_loaded = Gauge(
            "vllm:lora_adapter_loaded", "1 while an adapter is resident at that level.",
            ["adapter_name", "level", "pinned"], registry=r,
        )

    def rebalance_adapter_labels(self) -> None:
        demoted = self.adapter_labels.rebalance()
        if demoted:
            for collector in (self.requests, self.prompt_tokens, self.generated_tokens):
                collector.forget(demoted)

    def set_lora_info(self, max_lora: int, running: list[str], waiting: list[str]) -> None:
        # The picker reads the newest series; stale label sets are cleared so only one exists.
        self.vllm_lora_info.clear()
        self.vllm_lora_info.labels(
            max_lora=str(max_lora),
            running_lora_adapters=",".join(sorted(running)),
            waiting_lora_adapters=",".join(sorted(waiting)),
        ).set(time.time())
