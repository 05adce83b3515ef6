"""Tiered cache: byte budgets with LRU eviction, pins, explicit load/unload, and metrics.

The state table (GET /v1/adapters: each adapter's status) is asserted after every step."""

from __future__ import annotations

import pytest

from tests.conftest import metric, start_server, stop_server, tiny_settings
from tests.unit.lifecycle.conftest import ADMIN, ADMIN_HEADERS, KEY, KEY_HEADERS, upload


def table(client) -> dict[str, str]:
    return {a["name"]: a["status"] for a in client.get("/v1/adapters", headers=ADMIN_HEADERS).json()["adapters"]}


def use(client, name: str) -> None:
    response = client.post("/v1/generate", json={"prompt": "one two", "adapter": name, "max_new_tokens": 2},
                           headers=KEY_HEADERS)
    assert response.status_code == 200, response.text


@pytest.fixture
def budgets(server):
    """The cpu tier's budget is the registry's, the device tier's the engine's (its slots)."""
    registry, engine = server.services.registry, server.services.engine
    saved = registry.cpu_budget_bytes, engine.device_budget_bytes
    yield registry, engine
    registry.cpu_budget_bytes, engine.device_budget_bytes = saved


def test_budgets_evict_least_recently_used_and_pins_stay(client, sources, budgets):
    registry, engine = budgets
    for name, key in (("tier-a", "v1"), ("tier-b", "v2"), ("tier-c", "v3")):
        assert upload(client, name, sources[key]).status_code == 201
    size = registry.entries["tier-a"].versions[registry.entries["tier-a"].current].nbytes
    registry.cpu_budget_bytes = 2 * size
    engine.device_budget_bytes = 2 * size
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


@pytest.fixture(scope="module")
def two_slots(tiny_llama, tmp_path_factory):
    """A server whose engine has two adapter slots, so a third adapter forces an eviction."""
    settings = tiny_settings(tiny_llama, tmp_path_factory.mktemp("two-slot-store"), tmp_path_factory.mktemp("srv"),
                             admin_token=ADMIN, api_keys=[KEY], max_device_adapters=2)
    running = start_server(settings)
    yield running
    stop_server(running)


def test_engine_slot_lru_evicts_around_a_pin_then_takes_it_once_unpinned(two_slots, sources):
    """No byte budgets here: only the engine's own slot LRU decides, and the pinned adapter is
    its least recently used slot whenever a third adapter needs one. Device loads are counted
    too: a pin that let its slot go and was warmed again afterwards would end in the same table."""
    engine = two_slots.services.engine
    with two_slots.client() as client:
        def device_loads_during(action) -> float:
            before = metric(client, "adaptserve_adapter_load_seconds_count", tier="device")
            action()
            return metric(client, "adaptserve_adapter_load_seconds_count", tier="device") - before

        for name, source in (("pinned", "v1"), ("x", "v2"), ("y", "v3")):
            assert upload(client, name, sources[source]).status_code == 201
        keys = {name: two_slots.services.registry.lookup(name).key for name in ("pinned", "x", "y")}
        assert table(client) == {"pinned": "cpu", "x": "cpu", "y": "cpu"}

        assert client.post("/v1/adapters/pinned/pin", headers=ADMIN_HEADERS).json()["pinned"] is True
        use(client, "x")
        assert set(engine.resident_adapters()) == {keys["pinned"], keys["x"]}
        # Both slots taken: the pinned one is older, but only x may go (y is the one load).
        assert device_loads_during(lambda: use(client, "y")) == 1
        assert table(client) == {"pinned": "device", "x": "cpu", "y": "device"}
        assert set(engine.resident_adapters()) == {keys["pinned"], keys["y"]}

        assert client.post("/v1/adapters/pinned/unpin", headers=ADMIN_HEADERS).json()["pinned"] is False
        assert device_loads_during(lambda: use(client, "x")) == 1  # now the pinned slot's turn to go
        assert table(client) == {"pinned": "cpu", "x": "device", "y": "device"}
        assert set(engine.resident_adapters()) == {keys["x"], keys["y"]}


def test_lifecycle_metrics_count_what_each_step_did(server, client, sources):
    """Counts are deltas over steps this test makes on its own adapter, whatever ran before."""
    assert upload(client, "metrics-probe", sources["v4"]).status_code == 201  # validated: warm in cpu
    series = [("adaptserve_adapter_cache_hits_total", "cpu"), ("adaptserve_adapter_cache_hits_total", "device"),
              ("adaptserve_adapter_cache_misses_total", "cpu"), ("adaptserve_adapter_cache_misses_total", "device"),
              ("adaptserve_adapter_cache_evictions_total", "cpu"),
              ("adaptserve_adapter_cache_evictions_total", "device"),
              ("adaptserve_adapter_load_seconds_count", "cpu"), ("adaptserve_adapter_load_seconds_count", "device")]

    def counts() -> dict[tuple[str, str], float]:
        return {(name, tier): metric(client, name, tier=tier) for name, tier in series}

    def step(action) -> dict[str, float]:
        before = counts()
        action()
        return {f"{name.removeprefix('adaptserve_adapter_')}[{tier}]": after - before[(name, tier)]
                for (name, tier), after in counts().items() if after != before[(name, tier)]}

    def unload():
        assert client.post("/v1/adapters/metrics-probe/unload", headers=ADMIN_HEADERS).status_code == 200

    assert step(unload) == {"cache_evictions_total[cpu]": 1}
    assert step(lambda: use(client, "metrics-probe")) == {
        "cache_misses_total[cpu]": 1, "load_seconds_count[cpu]": 1,
        "cache_misses_total[device]": 1, "load_seconds_count[device]": 1}
    assert step(lambda: use(client, "metrics-probe")) == {"cache_hits_total[cpu]": 1, "cache_hits_total[device]": 1}

    resident = server.services.engine.resident_adapters()
    assert metric(client, "adaptserve_adapters_resident", tier="device") == len(resident)
    loaded = {"adapter_name": "metrics-probe", "level": "gpu", "pinned": "false"}
    assert metric(client, "vllm:lora_adapter_loaded", **loaded) == 1
    assert client.post("/v1/adapters/metrics-probe/pin", headers=ADMIN_HEADERS).status_code == 200
    assert metric(client, "vllm:lora_adapter_loaded", **{**loaded, "pinned": "true"}) == 1
    assert client.post("/v1/adapters/metrics-probe/unpin", headers=ADMIN_HEADERS).status_code == 200

    assert step(unload) == {"cache_evictions_total[cpu]": 1, "cache_evictions_total[device]": 1}
    assert metric(client, "vllm:lora_adapter_loaded", adapter_name="metrics-probe") == 0
    assert metric(client, "adaptserve_adapters_resident", tier="device") == len(resident) - 1


def test_a_version_loading_for_a_request_is_not_the_one_an_eviction_pass_takes(server, client, sources, budgets,
                                                                                monkeypatch):
    """The store watcher's pass can run between a version's read and the request resuming; it
    must evict the older version, not the one just read for a waiting request (CI once saw
    exactly that: the fresh version dropped, the stale one kept)."""
    registry, engine = budgets
    for adapter in client.get("/v1/adapters", headers=ADMIN_HEADERS).json()["adapters"]:
        assert client.post(f"/v1/adapters/{adapter['name']}/unload", headers=ADMIN_HEADERS).status_code == 200
    for name, key in (("race-old", "v1"), ("race-new", "v2")):
        assert upload(client, name, sources[key]).status_code == 201
        assert client.post(f"/v1/adapters/{name}/unload", headers=ADMIN_HEADERS).status_code == 200
    use(client, "race-old")
    size = registry.lookup("race-old").package.nbytes  # both sources have the same shapes
    registry.cpu_budget_bytes = size
    engine.device_budget_bytes = size

    read = registry._load

    async def read_then_a_watcher_pass(chosen):
        package = await read(chosen)
        await registry._enforce()
        return package

    monkeypatch.setattr(registry, "_load", read_then_a_watcher_pass)
    use(client, "race-new")
    assert registry.lookup("race-new").package is not None
    assert registry.lookup("race-old").package is None
    assert {k: v for k, v in table(client).items() if k.startswith("race-")} == {"race-old": "stored",
                                                                                "race-new": "device"}
