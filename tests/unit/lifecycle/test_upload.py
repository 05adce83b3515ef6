"""POST /v1/adapters: auth, streamed cap, archives, and validation reporting every problem."""

from __future__ import annotations

import io
import pickle
import tarfile

import httpx
import pytest
import torch

from tests.conftest import metric
from tests.unit.lifecycle.conftest import (
    ADMIN_HEADERS,
    KEY_HEADERS,
    file_parts,
    first_key,
    staging_debris,
    upload,
)


def problems_of(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return " | ".join(response.json()["error"]["details"])


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 403),
    ({"Authorization": "Basic YWRtaW46eA=="}, 401),
    (KEY_HEADERS, 403),  # an inference key never manages adapters
])
def test_admin_routes_need_the_admin_token(client, sources, server, headers, status):
    assert upload(client, "auth-probe", sources["v1"], headers=headers).status_code == status
    assert client.get("/v1/adapters", headers=headers).status_code == status
    assert client.delete("/v1/adapters/auth-probe", headers=headers).status_code == status
    assert "auth-probe" not in server.services.registry.entries
    assert staging_debris(server.services.settings.adapters_dir) == []


def test_inference_needs_a_key_and_accepts_the_admin_token(client):
    body = {"prompt": "the quick", "max_new_tokens": 2}
    assert client.post("/v1/generate", json=body).status_code == 401
    assert client.post("/v1/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/v1/generate", json=body, headers=KEY_HEADERS).status_code == 200
    assert client.post("/v1/generate", json=body, headers=ADMIN_HEADERS).status_code == 200


def test_upload_answers_201_then_200_for_identical_bytes(client, sources):
    first = upload(client, "gen-up", sources["v1"])
    assert first.status_code == 201, first.text
    body = first.json()
    for field in ("name", "version", "sha256", "task", "peft_type", "rank", "target_modules", "size_bytes"):
        assert field in body
    assert body["version"] == body["sha256"][:12] and body["task"] == "generate" and body["rank"] == 4
    again = upload(client, "gen-up", sources["v1"])
    assert again.status_code == 200 and again.json()["version"] == body["version"]
    listed = client.get("/v1/adapters/gen-up", headers=ADMIN_HEADERS).json()
    assert [v["version"] for v in listed["versions"]] == [body["version"]]
    out = client.post("/v1/generate", json={"prompt": "the quick", "adapter": "gen-up", "max_new_tokens": 3},
                      headers=KEY_HEADERS)
    assert out.status_code == 200 and out.json()["adapter"]["version"] == body["version"]


def test_archives_upload_like_folders(client, sources):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(sources["v2"] / name, arcname=f"my-adapter/{name}")
    response = client.post("/v1/adapters", data={"name": "from-tar"}, headers=ADMIN_HEADERS,
                           files={"file": ("my-adapter.tar.gz", buffer.getvalue())})
    assert response.status_code == 201, response.text
    slip = io.BytesIO()
    with tarfile.open(fileobj=slip, mode="w:gz") as tar:
        tar.add(sources["v2"] / "adapter_config.json", arcname="../../adapter_config.json")
    response = client.post("/v1/adapters", data={"name": "slip"}, headers=ADMIN_HEADERS,
                           files={"file": ("x.tgz", slip.getvalue())})
    assert "'..'" in problems_of(response)


class _Exploit:
    """Unpickling this would create `marker`: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_and_never_unpickled(client, sources, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Exploit(marker)})
    files = file_parts(sources["v1"], ("adapter_config.json",)) + [("adapter_model.bin", ("adapter_model.bin", payload))]
    problems = problems_of(upload(client, "pickled", files=files))
    assert "pickle" in problems and "adapter_model.safetensors is missing" in problems
    torch_file = [("weights", ("adapter_model.pt", payload))] + file_parts(sources["v1"])
    assert "pickle" in problems_of(upload(client, "pickled", files=torch_file))
    assert not marker.exists()


@pytest.mark.parametrize("config, expected", [
    ({"r": 0}, "0 < r <= 64"),
    ({"r": -1}, "0 < r <= 64"),
    ({"r": 65}, "0 < r <= 64"),
    ({"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"target_modules": ["q_proj", "nonexistent_proj"]}, "'nonexistent_proj' does not exist"),
])
def test_bad_configs_are_refused(client, variant, config, expected):
    assert expected in problems_of(upload(client, "bad-config", variant(config=config)))


def test_nan_inf_and_foreign_shapes_name_the_module(client, variant):
    def poison(weights):
        weights[first_key(weights, "lora_A")][0, 0] = float("nan")
        weights[first_key(weights, "lora_B")][0, 0] = float("inf")

    problems = problems_of(upload(client, "bad-values", variant(tensors=poison)))
    assert problems.count("NaN or Inf") == 2

    def other_base(weights):  # an adapter trained for a base with a wider hidden size
        key = first_key(weights, "q_proj.lora_A")
        weights[key] = torch.randn(weights[key].shape[0], 128)

    problems = problems_of(upload(client, "bad-shape", variant(tensors=other_base)))
    assert "layers.0.self_attn.q_proj: lora_A shape (4, 128) does not fit [r, 64]" in problems


@pytest.mark.parametrize("name", [
    "../x", "/etc", "a\x00b", "gen\u202eexe", "x" * 200, "Gen-A", "gen\u0430", "\uff47en", "", ".hidden",
])
def test_bad_names_are_refused_and_touch_nothing(client, sources, server, name):
    store = server.services.settings.adapters_dir
    before = sorted(p.name for p in store.iterdir())
    response = upload(client, name, sources["v1"])
    assert response.status_code == 422, response.text
    assert "name" in problems_of(response)
    assert sorted(p.name for p in store.iterdir()) == before


def test_every_problem_is_listed_in_one_answer(client, variant):
    problems = problems_of(upload(client, "../Bad", variant(config={"r": 0, "auto_map": {"a": "b"}})))
    assert "name '../Bad'" in problems and "auto_map" in problems and "0 < r <= 64" in problems


def test_oversize_uploads_get_413_and_leave_no_staging(client, sources, server):
    settings = server.services.settings
    store = settings.adapters_dir
    weights = (sources["v1"] / "adapter_model.safetensors").read_bytes()
    limit = settings.max_upload_bytes
    settings.max_upload_bytes = len(weights) // 2
    try:
        declared = upload(client, "too-big", sources["v1"])
        assert declared.status_code == 413

        def chunks():  # no Content-Length: the cap must hold while the bytes stream in
            boundary = b"xyzzy"
            yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="name"\r\n\r\ntoo-big\r\n'
            yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="f"; '
                   b'filename="adapter_model.safetensors"\r\n\r\n')
            for start in range(0, len(weights), 1024):
                yield weights[start:start + 1024]
            yield b"\r\n--" + boundary + b"--\r\n"

        streamed = client.post("/v1/adapters", content=chunks(),
                               headers={**ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=xyzzy"})
        assert streamed.status_code == 413
    finally:
        settings.max_upload_bytes = limit
    assert "too-big" not in server.services.registry.entries
    assert not (store / "too-big").exists()
    assert staging_debris(store) == []


def test_upload_metrics_count_each_outcome(client, sources, variant, server):
    """Counts are deltas over the four uploads made here, whatever ran before."""
    outcomes = ("created", "unchanged", "rejected", "too_large")
    before = {o: metric(client, "adaptserve_adapter_uploads_total", outcome=o) for o in outcomes}
    assert upload(client, "count-probe", sources["v3"]).status_code == 201
    assert upload(client, "count-probe", sources["v3"]).status_code == 200
    assert upload(client, "count-probe", variant(config={"r": 0})).status_code == 422
    settings = server.services.settings
    limit, settings.max_upload_bytes = settings.max_upload_bytes, 1024
    try:
        assert upload(client, "count-probe", sources["v4"]).status_code == 413
    finally:
        settings.max_upload_bytes = limit
    after = {o: metric(client, "adaptserve_adapter_uploads_total", outcome=o) for o in outcomes}
    assert {o: after[o] - before[o] for o in outcomes} == dict.fromkeys(outcomes, 1)
