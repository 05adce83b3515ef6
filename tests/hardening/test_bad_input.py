"""Bad input, end to end, on a split server (inference port + admin port): every refusal has
its status and error code, and leaves the store's files, the registry and the engine's rows
exactly as they were.

The common cases (missing fields, 0/negative/fractional max_new_tokens, five stop strings,
unknown adapter) are in tests/unit/api; the upload rules in tests/unit/lifecycle. Here:
the extremes (deep nesting, 100 MB chunked bodies, huge n / logprobs / lists), the upload
cases through both ports, and every admin route with every wrong credential.
"""

from __future__ import annotations

import io
import json
import select
import socket
import tarfile
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from server.api import adapters as adapters_api
from server.api import merges as merges_api
from server.api import routes as routes_api
from tests.hardening.conftest import ADMIN_HEADERS, KEY_HEADERS, MAX_UPLOAD, settled_state

JSON = {"content-type": "application/json"}
HUNDRED_MB = 100 * 1024 * 1024
UPLOAD_OPENING = b'--b\r\nContent-Disposition: form-data; name="f"; filename="adapter_model.safetensors"\r\n\r\n'
CHAT = [{"role": "user", "content": "hi"}]
DEEP_LIST = b"[" * 100_000 + b"]" * 100_000  # far past json's recursion limit, well under 2 MB
DEEP_DICT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


INFERENCE_CASES = [
    # (path, body: dict or raw bytes, status, code)
    ("/v1/generate", b'{"prompt":' + DEEP_LIST + b"}", 400, "invalid_request"),
    ("/v1/chat/completions", b'{"model":"gen-a","messages":' + DEEP_DICT + b"}", 400, "invalid_request"),
    ("/v1/generate", b'{"prompt": "\\ud800 lone surrogate"}', 422, "invalid_parameter"),
    ("/v1/chat/completions", b'{"model":"gen-a","messages":[{"role":"user","content":"\\udfff"}]}',
     400, "invalid_request"),
    ("/v1/classify", b'{"adapter":"sentiment","inputs":["ok","\\ud834"]}', 422, "invalid_parameter"),
    ("/v1/generate", b'{"prompt": "x", "temperature": NaN}', 422, "invalid_parameter"),
    ("/v1/generate", b'{"prompt": "x", "top_p": Infinity}', 422, "invalid_parameter"),
    ("/v1/generate", b'{"prompt": "x", "max_new_tokens": "many"}', 422, "invalid_parameter"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 10**40}, 422, "limit_exceeded"),
    ("/v1/generate", {"prompt": "x", "seed": 2**64}, 422, "invalid_parameter"),
    ("/v1/completions", {"model": "gen-a", "prompt": "x", "max_tokens": -1}, 400, "invalid_request"),
    ("/v1/completions", {"model": "gen-a", "prompt": "x", "max_tokens": 10**40}, 400, "limit_exceeded"),
    ("/v1/completions", {"model": "gen-a", "prompt": "x", "n": 10**9}, 400, "invalid_request"),
    ("/v1/completions", {"model": "gen-a", "prompt": ["x"] * 10_000}, 400, "invalid_request"),
    ("/v1/completions", {"model": "gen-a", "prompt": "x", "logprobs": 10**6}, 400, "limit_exceeded"),
    ("/v1/completions", {"model": "gen-a", "prompt": [10**9], "max_tokens": 1}, 400, "invalid_parameter"),
    ("/v1/chat/completions", {"model": "gen-a", "messages": CHAT, "logprobs": True, "top_logprobs": 10**6},
     400, "limit_exceeded"),
    ("/v1/generate", {"prompt": "x", "stop": ["a"] * 100_000}, 422, "limit_exceeded"),
    ("/v1/generate", {"prompt": "x", "stop": ["a" * 100_000]}, 422, "limit_exceeded"),
    ("/v1/chat/completions", {"model": "gen-a", "messages": CHAT, "stop": ["s"] * 100_000},
     400, "limit_exceeded"),
    ("/v1/classify", {"adapter": "sentiment", "inputs": ["x"] * 100_000}, 422, "limit_exceeded"),
    # Longer than the tiny base's 256-token context, though under max_prompt_tokens.
    ("/v1/chat/completions", {"model": "gen-a", "messages": [{"role": "user", "content": "one two " * 300}]},
     400, "limit_exceeded"),
    ("/v1/generate", {"prompt": "x", "task": "no-such-task"}, 404, "adapter_not_found"),
    ("/v1/classify", {"task": "no-such-task", "inputs": "x"}, 404, "adapter_not_found"),
    ("/v1/generate", {"prompt": "x", "adapter": "../../etc/passwd"}, 404, "adapter_not_found"),
    ("/v1/generate", {"prompt": "x", "adapter": "gen-a@../../versions"}, 404, "adapter_version_not_found"),
    ("/v1/chat/completions", {"model": "gen-a@ffffffffffff", "messages": CHAT}, 404, "adapter_version_not_found"),
    ("/v1/generate", {"prompt": "x", "adapters": [{"name": "gen-a", "weight": 1e308}, {"name": "gen-a"}]},
     422, "invalid_parameter"),
    ("/v1/generate", {"prompt": "x", "adapters": [{"name": "gen-a"}] * 1000}, 422, "limit_exceeded"),
]


@pytest.mark.parametrize("path, body, status, code", INFERENCE_CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[1]}-{c[3]}" for i, c in enumerate(INFERENCE_CASES)])
def test_refused_inference_changes_nothing(split, path, body, status, code):
    before = settled_state(split.services)
    with split.client(headers=KEY_HEADERS) as client:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=JSON)
        else:
            response = client.post(path, json=body)
    assert response.status_code == status, response.text[:500]
    assert response.json()["error"]["code"] == code, response.text[:500]
    assert settled_state(split.services) == before


def _send_until_answered(url: str, method: str, path: str, headers: dict[str, str],
                         opening: bytes) -> tuple[int, bytes]:
    """Stream a 100 MB chunked body, stopping as soon as the server answers.

    Returns (bytes sent, the answer's first bytes). The cap has to hold while the body
    streams in, not after it was buffered, so the answer must come long before the end."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
    conn.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
    conn.sendall(f"{len(opening):x}\r\n".encode() + opening + b"\r\n")
    chunk = b" " * 65536  # whitespace: valid so far, so only the cap can stop it
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    try:
        while sent < HUNDRED_MB and not select.select([conn], [], [], 0)[0]:
            conn.sendall(framed)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed after answering: the answer is in our receive buffer
    answer = b""
    try:
        while not answer.endswith(b"}"):  # the JSON error body ends the answer
            data = conn.recv(65536)
            if not data:
                break
            answer += data
    except ConnectionResetError:
        pass
    finally:
        conn.close()
    return sent, answer


@pytest.mark.parametrize("port, method, path, cap", [
    ("public", "POST", "/v1/generate", 2_000_000),
    ("public", "POST", "/v1/chat/completions", 2_000_000),
    ("admin", "POST", "/v1/adapters", MAX_UPLOAD),
    ("admin", "PUT", "/v1/routes/chat", 2_000_000),
])
def test_a_100_mb_chunked_body_is_cut_at_the_cap(split, port, method, path, cap):
    before = settled_state(split.services)
    url = split.public.url if port == "public" else split.admin_url
    kind = "multipart/form-data; boundary=b" if path == "/v1/adapters" else "application/json"
    headers = {**(KEY_HEADERS if port == "public" else ADMIN_HEADERS), "Content-Type": kind}
    # The upload's bytes are a file part's data, so the parser accepts them until the cap.
    opening = UPLOAD_OPENING if path == "/v1/adapters" else b"{"
    sent, answer = _send_until_answered(url, method, path, headers, opening)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"payload_too_large" in answer
    # Socket buffers on both sides hold a few MB; anything near 100 MB means it was all read.
    assert sent < cap + 16 * 1024 * 1024, f"{sent} bytes went in before the 413"
    assert settled_state(split.services) == before


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _upload_cases(source: Path) -> dict[str, tuple[dict, list, int, str]]:
    """name -> (form fields, file parts, status on the admin port, error code)."""
    config = (source / "adapter_config.json").read_bytes()
    weights = (source / "adapter_model.safetensors").read_bytes()
    good = [("f", ("adapter_config.json", config)), ("f", ("adapter_model.safetensors", weights))]
    evil_config = json.dumps({**json.loads(config), "auto_map": {"AutoModel": "x.Y"}, "trust_remote_code": True})
    return {
        "bad-name": ({"name": "../../etc"}, good, 422, "adapter_invalid"),
        "pickle": ({"name": "pickled"}, [good[0], ("f", ("adapter_model.bin", b"\x80\x04K\x01."))],
                   422, "adapter_invalid"),
        "traversal-filename": ({"name": "walker"}, good + [("f", ("../../../etc/cron.d/job", b"x"))],
                               422, "adapter_invalid"),
        "remote-code-config": ({"name": "remote"}, [("f", ("adapter_config.json", evil_config.encode())), good[1]],
                               422, "adapter_invalid"),
        "tar-dotdot": ({"name": "tarred"}, [("f", ("a.tar.gz", _tar({"../adapter_config.json": config})))],
                       422, "adapter_invalid"),
        "long-field": ({"name": "n" * 5000}, good, 422, "invalid_parameter"),
        "no-files": ({"name": "empty"}, [("f", ("notes.txt", b""))], 422, "adapter_invalid"),
        "oversize": ({"name": "huge"}, [good[0], ("f", ("adapter_model.safetensors", b"\0" * (MAX_UPLOAD + 1)))],
                     413, "payload_too_large"),
    }


CASE_NAMES = ["bad-name", "pickle", "traversal-filename", "remote-code-config", "tar-dotdot", "long-field",
              "no-files", "oversize"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_uploads_through_both_ports_change_nothing(split, llama_adapters, case):
    fields, files, status, code = _upload_cases(llama_adapters["gen-a"])[case]
    before = settled_state(split.services)
    with split.client(headers=ADMIN_HEADERS) as public, split.admin(headers=ADMIN_HEADERS) as admin:
        # The public port has no management routes at all, whatever the token.
        on_public = public.post("/v1/adapters", data=fields, files=files)
        assert on_public.status_code == 404 and on_public.json()["error"]["code"] == "not_found"
        on_admin = admin.post("/v1/adapters", data=fields, files=files)
    assert on_admin.status_code == status, on_admin.text[:500]
    assert on_admin.json()["error"]["code"] == code
    assert settled_state(split.services) == before


def test_a_body_that_is_not_multipart_is_refused(split):
    before = settled_state(split.services)
    with split.admin(headers=ADMIN_HEADERS) as admin:
        garbage = admin.post("/v1/adapters", content=b"a" * 5000,
                             headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert garbage.status_code == 422 and garbage.json()["error"]["code"] == "invalid_parameter"
        plain = admin.post("/v1/adapters", json={"name": "x"})
        assert plain.status_code == 422 and plain.json()["error"]["code"] == "invalid_parameter"
    assert settled_state(split.services) == before


def _admin_routes() -> list[tuple[str, str]]:
    """(method, concrete path) of every management route, read from the routers themselves."""
    concrete = {"{name}": "gen-a", "{ref}": "gen-a", "{task}": "chat"}
    found = []
    for router in (adapters_api.router, merges_api.router, routes_api.router):
        for route in router.routes:
            if isinstance(route, APIRoute):
                path = route.path
                for placeholder, value in concrete.items():
                    path = path.replace(placeholder, value)
                found += [(method, path) for method in sorted(route.methods)]
    return found


@pytest.mark.parametrize("method, path", _admin_routes())
def test_every_admin_route_refuses_every_wrong_credential(split, method, path):
    before = settled_state(split.services)
    wrong = [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer not-the-token"}, 403, "forbidden"),
        (KEY_HEADERS, 403, "forbidden"),  # an inference key never manages adapters
        ({"Authorization": "Basic YWRtaW46eA=="}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {ADMIN_HEADERS['Authorization'][7:]}x"}, 403, "forbidden"),
    ]
    with split.admin() as admin, split.client() as public:
        for headers, status, code in wrong:
            response = admin.request(method, path, headers=headers, json={})
            assert response.status_code == status, (headers, response.text)
            assert response.json()["error"]["code"] == code
            assert response.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)
        for headers in ({}, ADMIN_HEADERS):
            response = public.request(method, path, headers=headers, json={})
            assert response.status_code in (404, 405), response.text
    assert settled_state(split.services) == before


@pytest.mark.parametrize("method, path", [("POST", "/v1/generate"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/classify"), ("GET", "/v1/models")])
def test_inference_refuses_wrong_keys_and_is_absent_from_the_admin_port(split, method, path):
    before = settled_state(split.services)
    with split.client() as public, split.admin(headers=ADMIN_HEADERS) as admin:
        assert public.request(method, path, json={}).status_code == 401
        refused = public.request(method, path, json={}, headers={"Authorization": "Bearer sk-guess"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert admin.request(method, path, json={}).status_code == 404
    assert settled_state(split.services) == before
