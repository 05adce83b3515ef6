"""A split server for the hardening suites: inference on one listener, management on a second
(as `--admin-port` serves it), both over one Services, with an admin token and an API key.

`state()` captures everything a refused request must leave untouched: the store's files
(names, sizes, hashes), the registry's entries and the engine's rows.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, free_port, start_server, stop_server, tiny_settings

ADMIN = "hardening-admin-token"
KEY = "hardening-api-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
KEY_HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_UPLOAD = 1_000_000  # small, so oversize uploads are cheap to send


@dataclass
class Split:
    public: RunningServer
    admin_url: str
    admin_server: object
    admin_thread: threading.Thread

    @property
    def services(self):
        return self.public.services

    def client(self, **kwargs) -> httpx.Client:
        return self.public.client(**kwargs)

    def admin(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.admin_url, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def split(tiny_llama, llama_adapters, tmp_path_factory):
    import uvicorn

    from server.app import create_app

    store = tmp_path_factory.mktemp("hardening-store")
    for name in ("gen-a", "sentiment"):
        shutil.copytree(llama_adapters[name], store / name)
    settings = tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("hardening-srv"), admin_token=ADMIN,
                             api_keys=[KEY], max_upload_bytes=MAX_UPLOAD, admin_port=free_port())
    public = start_server(settings, surface="public")
    admin_app = create_app(settings, services=public.services, surface="admin")
    server = uvicorn.Server(uvicorn.Config(admin_app, host="127.0.0.1", port=settings.admin_port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    admin_url = f"http://127.0.0.1:{settings.admin_port}"
    while not server.started:
        thread.join(0.05)
    yield Split(public, admin_url, server, thread)
    server.should_exit = True
    thread.join(30)
    stop_server(public)


def store_listing(root: Path) -> dict[str, str]:
    """Every file under the store (staging included) with its sha256: any change shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def state(services) -> dict:
    registry = services.registry
    stats = services.engine.stats()
    return {
        "store": store_listing(services.settings.adapters_dir),
        "entries": {n: (e.current, sorted(e.versions), e.pinned) for n, e in registry.entries.items()},
        "rejected": sorted(registry.rejected),
        "rows": (stats.get("running"), stats.get("waiting")),
        "in_flight": services.scheduler.in_flight,
    }


def settled_state(services, timeout: float = 5.0) -> dict:
    """`state` once the engine has no rows (a refused request may race a finishing one)."""
    import time

    deadline = time.monotonic() + timeout
    snapshot = state(services)
    while snapshot["rows"] != (0, 0) or snapshot["in_flight"]:
        assert time.monotonic() < deadline, f"engine rows never went back to 0: {snapshot}"
        time.sleep(0.05)
        snapshot = state(services)
    return snapshot
