"""Merges over HTTP: per-request (cached by recipe + source hashes), persistent
(`POST /v1/adapters/merge`), classify merges and fan-out, and the caps."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN_TOKEN, make_lora

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SOURCES = [{"name": "gen-a", "weight": 0.6}, {"name": "gen-b", "weight": 0.9}]
PROMPT = "paris is the"


def generate(client, expect: int = 200, **body) -> dict:
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, **body})
    assert response.status_code == expect, response.text
    return response.json()


def test_per_request_cat_merge_is_cached_and_equals_the_stored_merge(routed_replicas):
    a, _ = routed_replicas
    merges = a.services.inference.merges
    with a.client() as client, a.client(headers=ADMIN) as admin:
        first = generate(client, adapters=SOURCES)
        assert first["adapter"]["name"] == "gen-a+gen-b"
        built = merges.merges
        again = generate(client, adapters=SOURCES, merge={"method": "cat"})
        assert again["adapter"] == first["adapter"] and again["text"] == first["text"]
        assert merges.merges == built, "the same recipe over the same sources must come from the cache"

        stored = admin.post("/v1/adapters/merge", json={"name": "mix", "sources": SOURCES, "method": "cat"})
        assert stored.status_code == 201, stored.text
        body = stored.json()
        assert body["rank"] == 12 and body["merge"]["method"] == "cat" and body["merge"]["relative_error"] < 1e-6
        assert [s["sha256"] for s in body["merge"]["sources"]] == [
            a.services.registry.lookup(n).key for n in ("gen-a", "gen-b")]
        repeat = admin.post("/v1/adapters/merge", json={"name": "mix", "sources": SOURCES, "method": "cat"})
        assert repeat.status_code == 200 and repeat.json()["version"] == body["version"]
        assert generate(client, adapter="mix")["text"] == first["text"]
        assert admin.get("/v1/adapters/mix").json()["current"] == body["version"]


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_linear", "dare_ties"])
def test_svd_family_merges_serve_per_request_and_stored(routed_replicas, method):
    a, _ = routed_replicas
    with a.client() as client, a.client(headers=ADMIN) as admin:
        merge = {"method": method, **({"density": 0.5} if method in ("ties", "dare_linear", "dare_ties") else {})}
        served = generate(client, adapters=SOURCES, merge=merge)
        assert served["adapter"]["name"] == "gen-a+gen-b"
        stored = admin.post("/v1/adapters/merge", json={"name": f"mix-{method.replace('_', '-')}",
                                                        "sources": SOURCES, **merge})
        assert stored.status_code == 201, stored.text
        print(f"\n{method}: stored rank {stored.json()['rank']}, relative error "
              f"{stored.json()['merge']['relative_error']:.3f}")
        assert generate(client, adapter=stored.json()["name"])["text"] == served["text"]


def test_a_new_source_version_means_a_new_merge(routed_replicas, tiny_llama, tmp_path):
    a, b = routed_replicas
    sources = [{"name": "gen-a", "weight": 1.0}, {"name": "gen-c", "weight": 1.0}]
    merges = a.services.inference.merges
    with a.client() as client, a.client(headers=ADMIN) as admin:
        before = generate(client, adapters=sources)
        built = merges.merges
        newer = make_lora(tiny_llama, tmp_path / "gen-c", r=4, seed=10, weight_scale=3.0, targets=("q_proj", "o_proj"))
        files = {f: (f, (newer / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
        upload = admin.post("/v1/adapters", data={"name": "gen-c"}, files=files)
        assert upload.status_code == 201, upload.text
        after = generate(client, adapters=sources)
    assert after["adapter"]["version"] != before["adapter"]["version"]
    assert merges.merges == built + 1
    key = a.services.inference.merges.entries[next(reversed(merges.entries))].package.manifest.extra["merge"]
    assert key["sources"][1]["version"] == upload.json()["version"]


def test_classify_merge_needs_agreeing_heads_and_fanout_returns_each_adapter(routed_replicas):
    a, _ = routed_replicas
    texts = ["i love this product it is great", "this is terrible and i hate it"]
    with a.client() as client:
        merged = client.post("/v1/classify", json={"inputs": texts, "merge": {"method": "cat"},
                                                   "adapters": [{"name": "sentiment"}, {"name": "sentiment2"}]})
        assert merged.status_code == 200, merged.text
        assert set(merged.json()["results"][0]["scores"]) == {"negative", "neutral", "positive"}
        disagree = client.post("/v1/classify", json={"inputs": texts, "merge": {"method": "cat"},
                                                     "adapters": [{"name": "sentiment"}, {"name": "topic"}]})
        assert disagree.status_code == 422 and "heads disagree" in disagree.json()["error"]["message"]

        fanout = client.post("/v1/classify", json={"inputs": texts,
                                                   "adapters": [{"name": "sentiment"}, {"name": "topic"}]})
        assert fanout.status_code == 200, fanout.text
        singles = {n: client.post("/v1/classify", json={"inputs": texts, "adapter": n}).json()
                   for n in ("sentiment", "topic")}
    body = fanout.json()
    assert [r["name"] for r in body["adapters"]] == ["sentiment", "topic"]
    for i, per_input in enumerate(body["results"]):
        for result in per_input["results"]:
            single = singles[result["adapter"]["name"]]["results"][i]
            assert result["label"] == single["label"]
            assert result["scores"] == pytest.approx(single["scores"], abs=1e-5)


def test_merge_caps_and_bad_requests(routed_replicas):
    a, _ = routed_replicas
    with a.client() as client:
        too_many = generate(client, 422, adapters=[{"name": "gen-a"}] * 9)
        assert too_many["error"]["param"] == "adapters"
        too_big = generate(client, 422, adapters=[{"name": "gen-b"}, {"name": "gen-b"}, {"name": "gen-a"}])
        assert "rank 20" in too_big["error"]["message"]  # max_merge_rank=16 on these replicas
        generate(client, 422, adapters=SOURCES, merge={"method": "cat", "rank": 4})
        generate(client, 422, adapters=SOURCES, merge={"method": "ties", "density": 0})
        generate(client, 422, merge={"method": "cat"})
        generate(client, 400, adapters=[{"name": "gen-a"}, {"name": "sentiment"}])
        generate(client, 404, adapters=[{"name": "gen-a"}, {"name": "ghost"}])
