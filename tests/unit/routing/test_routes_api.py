"""Task routes over HTTP on two replicas sharing a store: file at start, admin API, convergence,
sticky keys on both APIs, fallback, metrics by task."""

from __future__ import annotations

import time

from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def generate(client, **body):
    response = client.post("/v1/generate", json={"prompt": "the quick brown", "max_new_tokens": 2, **body})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(check, timeout: float = 5.0):
    started = time.monotonic()
    while True:
        value = check()
        if value or time.monotonic() - started > timeout:
            return value, time.monotonic() - started
        time.sleep(0.05)


def test_routes_file_is_applied_at_start_and_stored_for_every_replica(routed_replicas):
    for replica in routed_replicas:
        with replica.client(headers=ADMIN) as client:
            routes = {r["task"]: r for r in client.get("/v1/routes").json()["routes"]}
        assert [t["weight"] for t in routes["chat"]["targets"]] == [90, 10]
        assert routes["mood"]["resolves_to"]["sentiment"].startswith("sentiment@")


def test_route_api_needs_the_admin_token(routed_replicas):
    with routed_replicas[0].client() as client:
        assert client.put("/v1/routes/x", json={"adapter": "gen-a"}).status_code == 401
        bad = client.put("/v1/routes/x", json={"adapter": "gen-a"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 403
        invalid = client.put("/v1/routes/x", json={"targets": [], "fallback": "/etc"}, headers=ADMIN)
        assert invalid.status_code == 422 and len(invalid.json()["error"]["details"]) == 2


def test_a_route_set_on_one_replica_serves_on_the_other_within_5_s(routed_replicas):
    a, b = routed_replicas
    with a.client(headers=ADMIN) as admin_a, b.client(headers=ADMIN) as admin_b, b.client() as client_b:
        assert admin_a.put("/v1/routes/converge", json={"adapter": "gen-b"}).status_code == 200
        seen, elapsed = wait_for(lambda: admin_b.get("/v1/routes/converge").status_code == 200)
        assert seen, "replica B never saw the route"
        print(f"\nroute converged on replica B after {elapsed:.2f} s")
        served = generate(client_b, task="converge")
        assert served["adapter"]["name"] == "gen-b" and served["task"] == "converge"
        assert admin_a.delete("/v1/routes/converge").status_code == 200
        gone, _ = wait_for(lambda: client_b.post("/v1/generate", json={"prompt": "x", "task": "converge"})
                           .status_code == 404)
        assert gone


def test_sticky_key_keeps_a_caller_on_one_side_on_both_apis_and_both_replicas(routed_replicas):
    served: dict[str, set[str]] = {}
    for replica in routed_replicas:
        with replica.client() as client:
            for key in ("alice", "bob", "carol", "dave"):
                for _ in range(2):
                    native = client.post("/v1/generate", headers={"X-Route-Key": key},
                                         json={"prompt": "hello", "max_new_tokens": 1, "task": "chat"}).json()
                    served.setdefault(key, set()).add(f"{native['adapter']['name']}@{native['adapter']['version']}")
                openai = client.post("/v1/completions", json={"model": "task:chat", "prompt": "hello",
                                                              "max_tokens": 1, "user": key}).json()
                served[key].add(openai["model"])
    assert all(len(versions) == 1 for versions in served.values()), served


def test_fallback_serves_when_the_target_is_missing(routed_replicas):
    a, _ = routed_replicas
    with a.client(headers=ADMIN) as admin, a.client() as client:
        admin.put("/v1/routes/ghostly", json={"adapter": "ghost", "fallback": "gen-c"})
        admin.put("/v1/routes/to-base", json={"adapter": "ghost@123456789abc", "fallback": "base"})
        admin.put("/v1/routes/strict", json={"adapter": "ghost"})
        fell = generate(client, task="ghostly")
        assert fell["adapter"]["name"] == "gen-c" and fell["fallback"] is True
        based = generate(client, task="to-base")
        assert based["adapter"] is None and based["fallback"] is True
        assert client.post("/v1/generate", json={"prompt": "x", "task": "strict"}).status_code == 404
        assert client.post("/v1/generate", json={"prompt": "x", "task": "no-such-task"}).status_code == 404
        assert client.post("/v1/generate", json={"prompt": "x", "task": "chat", "adapter": "gen-a"}).status_code \
            == 422
        mood = client.post("/v1/classify", json={"inputs": ["i love it"], "task": "mood"}).json()
        assert mood["adapter"]["name"] == "sentiment" and mood["task"] == "mood"
        metrics = client.get("/metrics").text
    assert 'adaptserve_task_requests_total{adapter="gen-c",route="fallback",task="ghostly"} 1.0' in metrics
    assert 'adaptserve_task_requests_total{adapter="__none__",route="failed",task="strict"} 1.0' in metrics
