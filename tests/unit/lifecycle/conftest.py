"""A server with an admin token and an inference key over an empty store, plus adapter
builders: good ones made with plain PEFT, bad ones derived from them by editing files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_lora, start_server, stop_server, tiny_settings

ADMIN = "admin-secret-token"
KEY = "inference-key-1"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
KEY_HEADERS = {"Authorization": f"Bearer {KEY}"}
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="session")
def sources(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Four distinct generation adapters (same shapes, different weights)."""
    root = tmp_path_factory.mktemp("lifecycle-sources")
    return {f"v{i}": make_lora(tiny_llama, root / f"v{i}", seed=10 + i, weight_scale=3.0) for i in range(1, 5)}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("lifecycle-store")
    settings = tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("srv"), admin_token=ADMIN,
                             api_keys=[KEY], store_poll_interval_s=0.2)
    running = start_server(settings)
    yield running
    stop_server(running)


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def file_parts(directory: Path, names=FILES) -> list:
    return [(n, (n, (directory / n).read_bytes())) for n in names]


def upload(client: httpx.Client, name: str, directory: Path | None = None, *, files=None,
           headers=ADMIN_HEADERS) -> httpx.Response:
    return client.post("/v1/adapters", data={"name": name}, files=files or file_parts(directory), headers=headers)


@pytest.fixture
def variant(sources, tmp_path) -> Callable[..., Path]:
    """A copy of adapter v1 with its config patched and/or its tensors rewritten."""

    def make(config: dict | None = None, tensors: Callable[[dict], None] | None = None) -> Path:
        directory = tmp_path / f"variant-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sources["v1"], directory)
        if config is not None:
            path = directory / "adapter_config.json"
            data = json.loads(path.read_text())
            data.update(config)
            path.write_text(json.dumps(data))
        if tensors is not None:
            weights = load_file(directory / "adapter_model.safetensors")
            tensors(weights)
            save_file(weights, directory / "adapter_model.safetensors")
        return directory

    return make



def first_key(weights: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in weights if part in k)[0]


def staging_debris(store: Path) -> list[Path]:
    return [p for p in (store / ".tmp").rglob("*") if p.is_file() or (p.is_dir() and any(p.iterdir()))]
