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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adaptserve_requests", "Requests by endpoint, adapter and HTTP status.",
            ["endpoint", "adapter", "status"], registry=r,
        )
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
        self.prompt_tokens = Counter(
            "adaptserve_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "adaptserve_generated_tokens", "Tokens generated.", ["adapter"], registry=r
        )
        self.adapters_registered = Gauge(
            "adaptserve_adapters_registered", "Adapters (names) registered and servable.", registry=r
        )
        self.adapters_rejected = Gauge(
            "adaptserve_adapters_rejected", "Adapter folders in the store that failed validation.", registry=r
        )
        # Adapter lifecycle: tier = stored (disk) | cpu (host memory) | device (engine slots).
        self.adapter_load_seconds = Histogram(
            "adaptserve_adapter_load_seconds", "Time to bring an adapter into a tier (cpu: read + validate; "
            "device: copy into a slot).", ["tier"], buckets=TTFT_BUCKETS, registry=r,
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

    def set_lora_info(self, max_lora: int, running: list[str], waiting: list[str]) -> None:
        # The picker reads the newest series; stale label sets are cleared so only one exists.
        self.vllm_lora_info.clear()
        self.vllm_lora_info.labels(
            max_lora=str(max_lora),
            running_lora_adapters=",".join(sorted(running)),
            waiting_lora_adapters=",".join(sorted(waiting)),
        ).set(time.time())
