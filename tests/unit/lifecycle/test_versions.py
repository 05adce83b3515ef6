"""Versions, the current alias, rollback and delete, including while requests stream."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from tests.unit.lifecycle.conftest import ADMIN_HEADERS, KEY_HEADERS, upload

PROMPT = {"prompt": "the quick brown", "max_new_tokens": 24}


def generate(client, adapter: str) -> tuple[int, dict]:
    response = client.post("/v1/generate", json={**PROMPT, "adapter": adapter}, headers=KEY_HEADERS)
    return response.status_code, response.json()


def info(client, name: str) -> dict:
    return client.get(f"/v1/adapters/{name}", headers=ADMIN_HEADERS).json()


def test_new_version_becomes_current_and_old_stays_addressable(client, sources):
    v1 = upload(client, "ver", sources["v1"]).json()["version"]
    _, on_v1 = generate(client, "ver")
    v2 = upload(client, "ver", sources["v2"]).json()["version"]
    assert info(client, "ver")["current"] == v2
    status, on_v2 = generate(client, "ver")
    assert status == 200 and on_v2["adapter"]["version"] == v2
    # Keyed by content, never by name: the new version's output is not a stale copy.
    assert on_v2["text"] != on_v1["text"]
    _, pinned = generate(client, f"ver@{v1}")
    assert pinned["adapter"]["version"] == v1 and pinned["text"] == on_v1["text"]
    assert generate(client, "ver@000000000000")[0] == 404

    rolled = client.post("/v1/adapters/ver/rollback", headers=ADMIN_HEADERS).json()
    assert rolled["current"] == v1
    assert generate(client, "ver")[1]["text"] == on_v1["text"]
    forward = client.post(f"/v1/adapters/ver/rollback?version={v2}", headers=ADMIN_HEADERS).json()
    assert forward["current"] == v2
    assert client.post("/v1/adapters/ver/rollback?version=nope", headers=ADMIN_HEADERS).status_code == 404

    # Deleting the current version falls back to the previous one; deleting the name ends it.
    deleted = client.delete(f"/v1/adapters/ver@{v2}", headers=ADMIN_HEADERS).json()
    assert deleted["current"] == v1
    assert generate(client, f"ver@{v2}")[0] == 404
    assert client.delete("/v1/adapters/ver", headers=ADMIN_HEADERS).status_code == 200
    assert generate(client, "ver")[0] == 404
    assert client.get("/v1/adapters/ver", headers=ADMIN_HEADERS).status_code == 404
    assert client.post("/v1/adapters/ver/rollback", headers=ADMIN_HEADERS).status_code == 404


def test_concurrent_uploads_of_one_name_store_each_version_once(server, sources):
    def push(key: str) -> tuple[int, str]:
        with server.client() as c:
            response = upload(c, "race", sources[key])
            return response.status_code, response.json()["version"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(push, ["v1", "v2", "v3", "v4"] * 2))
    versions = {v for _, v in results}
    assert len(versions) == 4
    assert sorted(s for s, _ in results) == [200] * 4 + [201] * 4
    with server.client() as client:
        listed = info(client, "race")
        assert {v["version"] for v in listed["versions"]} == versions and listed["current"] in versions
        for version in versions:
            assert generate(client, f"race@{version}")[1]["adapter"]["version"] == version


def _stream(client, adapter: str):
    return client.stream("POST", "/v1/generate", json={**PROMPT, "max_new_tokens": 64, "adapter": adapter,
                                                       "stream": True}, headers=KEY_HEADERS)


def _events(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_requests_in_flight_finish_on_their_version_through_update_and_delete(server, sources):
    with server.client() as client, server.client() as admin:
        v1 = upload(admin, "live", sources["v1"]).json()["version"]
        v1_text = generate(client, f"live@{v1}")[1]["text"]
        with _stream(client, "live") as before_update:
            lines = before_update.iter_lines()
            first = next(lines)
            v2 = upload(admin, "live", sources["v2"]).json()["version"]
            v2_text = generate(client, "live")[1]["text"]
            with _stream(client, "live") as before_delete:
                delete_lines = before_delete.iter_lines()
                second = next(delete_lines)
                assert admin.delete("/v1/adapters/live", headers=ADMIN_HEADERS).status_code == 200
                assert generate(client, "live")[0] == 404
                deleted_events = _events([second, *delete_lines])
            update_events = _events([first, *lines])
    # Each stream ran to its end on the bytes it started with, whatever happened meanwhile.
    for events, version, text in ((update_events, v1, v1_text), (deleted_events, v2, v2_text)):
        final = events[-1]
        assert final["adapter"]["version"] == version and final.get("error") is None
        assert final["finish_reason"] in ("stop", "length")
        assert "".join(e["text"] for e in events)[: len(text)] == text
