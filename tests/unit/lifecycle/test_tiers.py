"""Tiered cache: byte budgets with LRU eviction, pins, explicit load/unload, and metrics.

The state table (GET /v1/adapters: each adapter's status) is asserted after every step."""

from __future__ import annotations

import pytest

from tests.unit.lifecycle.conftest import ADMIN_HEADERS, KEY_HEADERS, upload


def table(client) -> dict[str, str]:
    return {a["name"]: a["status"] for a in client.get("/v1/adapters", headers=ADMIN_HEADERS).json()["adapters"]}


def use(client, name: str) -> None:
    response = client.post("/v1/generate", json={"prompt": "one two", "adapter": name, "max_new_tokens": 2},
                           headers=KEY_HEADERS)
    assert response.status_code == 200, response.text


@pytest.fixture
def budgets(server):
    registry = server.services.registry
    saved = registry.cpu_budget_bytes, registry.device_budget_bytes
    yield registry
    registry.cpu_budget_bytes, registry.device_budget_bytes = saved


def test_budgets_evict_least_recently_used_and_pins_stay(client, sources, budgets):
    registry = budgets
    for name, key in (("tier-a", "v1"), ("tier-b", "v2"), ("tier-c", "v3")):
        assert upload(client, name, sources[key]).status_code == 201
    size = registry.entries["tier-a"].versions[registry.entries["tier-a"].current].nbytes
    registry.cpu_budget_bytes = 2 * size
    registry.device_budget_bytes = 2 * size
    for name in ("tier-a", "tier-b", "tier-c"):
        assert client.post(f"/v1/adapters/{name}/unload", headers=ADMIN_HEADERS).status_code == 200
    assert table(client) == {"tier-a": "stored", "tier-b": "stored", "tier-c": "stored"}

    assert client.post("/v1/adapters/tier-a/pin", headers=ADMIN_HEADERS).json()["pinned"] is True
    assert table(client)["tier-a"] == "device"  # pinning warms it on every replica
    use(client, "tier-b")
    assert table(client) == {"tier-a": "device", "tier-b": "device", "tier-c": "stored"}
    use(client, "tier-c")  # over both budgets: b is the least recently used unpinned one
    assert table(client) == {"tier-a": "device", "tier-b": "stored", "tier-c": "device"}
    use(client, "tier-b")
    assert table(client) == {"tier-a": "device", "tier-b": "device", "tier-c": "stored"}
    assert client.post("/v1/adapters/tier-a/unload", headers=ADMIN_HEADERS).status_code == 409

    assert client.post("/v1/adapters/tier-a/unpin", headers=ADMIN_HEADERS).json()["pinned"] is False
    use(client, "tier-c")  # now a is the least recently used
    assert table(client) == {"tier-a": "stored", "tier-b": "device", "tier-c": "device"}
    loaded = client.post("/v1/adapters/tier-a/load", headers=ADMIN_HEADERS).json()
    assert loaded["status"] == "device"
    assert table(client) == {"tier-a": "device", "tier-b": "stored", "tier-c": "device"}


def test_pinned_device_slot_survives_engine_lru(server, client, sources):
    """The engine's own slot LRU (slot count, not bytes) passes pinned adapters by too."""
    engine = server.services.engine
    assert upload(client, "pin-slot", sources["v4"]).status_code in (200, 201)
    client.post("/v1/adapters/pin-slot/pin", headers=ADMIN_HEADERS)
    key = server.services.registry.lookup("pin-slot").key
    assert key in engine.resident_adapters() and engine.slots.victim() != key
    client.post("/v1/adapters/pin-slot/unpin", headers=ADMIN_HEADERS)
    assert engine.slots.users[key] == 0


def test_lifecycle_metrics_are_exported(client):
    use(client, "tier-c")
    use(client, "tier-c")  # resident by now: a device hit
    text = client.get("/metrics").text
    for line in ('adaptserve_adapter_load_seconds_bucket{le="0.01",tier="cpu"}',
                 'adaptserve_adapter_load_seconds_count{tier="device"}',
                 'adaptserve_adapter_cache_hits_total{tier="device"}',
                 'adaptserve_adapter_cache_misses_total{tier="cpu"}',
                 'adaptserve_adapter_cache_evictions_total{tier="cpu"}',
                 'adaptserve_adapters_resident{tier="device"}',
                 'adaptserve_adapter_resident_bytes{tier="cpu"}',
                 'vllm:lora_adapter_loaded{adapter_name="tier-a",level="gpu",pinned="false"} 1.0'):
        assert line in text, line
