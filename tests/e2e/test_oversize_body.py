"""A client that sends a body the server refuses unread (a 60 MB JSON past the 2 MB cap, an
upload without the token) reads the error object, against a real server process.

The server answers at once but reads and drops the rest of the body before it ends the
answer, so it never closes a socket with unread bytes in it: that close sends a TCP reset,
which fails the client's write and can destroy the answer before the client reads it.
"""

from __future__ import annotations

import select
import socket

import httpx
import pytest

SIXTY_MB = 60 * 1024 * 1024
JSON_BODY = b'{"prompt": "' + b"a" * SIXTY_MB + b'"}'
UPLOAD_BODY = (b'--b\r\nContent-Disposition: form-data; name="f"; filename="adapter_model.safetensors"\r\n\r\n'
               + b"\0" * SIXTY_MB + b"\r\n--b--\r\n")


def _chunks(data: bytes, size: int = 1 << 20):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_60_mb_json_body_gets_a_readable_413(server_process, framing):
    content = JSON_BODY if framing == "content-length" else _chunks(JSON_BODY)
    with httpx.Client(base_url=server_process.url, timeout=60) as client:
        answer = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _head(path: str, kind: str, length: int, connection: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {length}\r\nConnection: {connection}\r\n\r\n").encode()


def _answer(conn: socket.socket) -> tuple[bytes, bytes]:
    """One answer with a Content-Length body: (head, body)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += conn.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


@pytest.mark.parametrize("case", ["json-413", "upload-401"])
def test_the_server_reads_a_refused_body_before_it_closes(server_process, case):
    if case == "json-413":
        url, path, kind, body, expected = server_process.url, "/v1/generate", "application/json", JSON_BODY, b"413"
    else:
        url, path, kind, body = server_process.admin_url, "/v1/adapters", "multipart/form-data; boundary=b", UPLOAD_BODY
        expected = b"401"
    with _connect(url) as conn:
        # `Connection: close` makes the server close once it has answered: the case that reset.
        conn.sendall(_head(path, kind, len(body), "close"))
        # A far client's view: the answer arrives while its body is still on the way.
        assert select.select([conn], [], [], 30)[0], "no answer to the head alone"
        conn.sendall(body)  # BrokenPipeError / ConnectionResetError here if the server closed on it
        head, error = _answer(conn)
        assert conn.recv(1) == b""  # then an orderly close
    assert head.startswith(b"HTTP/1.1 " + expected), head
    assert b'"code"' in error


def test_the_connection_stays_usable_after_a_refused_body(server_process):
    with _connect(server_process.url) as conn:
        conn.sendall(_head("/v1/generate", "application/json", len(JSON_BODY), "keep-alive") + JSON_BODY)
        head, _ = _answer(conn)
        assert head.startswith(b"HTTP/1.1 413")
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, body = _answer(conn)
        assert head.startswith(b"HTTP/1.1 200") and body == b'{"status":"ok"}'
