"""A real S3 API for tests: moto's standalone server in its own process on loopback, and a
TCP link in front of it that a test can cut to play an outage.

Clients reach it over HTTP the standard way (AWS_ENDPOINT_URL and static keys), exactly as
a replica reaches MinIO or Ceph; nothing is patched inside the process under test.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
from botocore.config import Config

from bench.run import free_port

REGION = "us-east-1"
_SESSION = boto3.session.Session()  # its loaded service models make each further client cheap


class MotoServer:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/moto-api/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("moto server did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def aws_env(endpoint: str) -> dict[str, str]:
    """What a replica needs in its environment to use the store at `endpoint` (boto3's own variables)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "2"}


def s3_client(endpoint: str):
    """A client that gives up after one retry, so an outage shows within seconds."""
    config = Config(connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 2})
    return _SESSION.client("s3", endpoint_url=endpoint, region_name=REGION, config=config,
                                          aws_access_key_id="testing", aws_secret_access_key="testing")


def new_bucket(endpoint: str) -> str:
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


class Link:
    """A TCP forwarder to `upstream_port`; `cut()` drops every connection and refuses new ones
    (they are accepted and closed at once) until `restore()`."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up = True
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self.up = False
            for sock in self._open:
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except (OSError, ValueError):
            return  # cut
        finally:
            with self._lock:
                self._open -= {a, b}
            a.close()
            b.close()
