"""One real `adaptserve serve` process shared by the e2e modules that only send it requests:
management on its own listener (as the Kubernetes manifests serve it), an import dir of
adapters made with plain PEFT for POST /v1/load_lora_adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, make_lora
from tests.e2e.test_replicas import Replica, start_replica, stop


@dataclass
class Server:
    replica: Replica
    admin_url: str
    store: Path
    imports: Path

    @property
    def url(self) -> str:
        return self.replica.url


@pytest.fixture(scope="session")
def lora_imports(tiny_llama, tmp_path_factory) -> Path:
    """Two training steps of one adapter, as a training loop leaves them for the server."""
    root = tmp_path_factory.mktemp("lora-imports")
    for step, seed in (("step-1", 41), ("step-2", 42)):
        make_lora(tiny_llama, root / step, seed=seed, weight_scale=3.0)
    return root


@pytest.fixture(scope="session")
def server_process(tiny_llama, lora_imports, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server-process")
    admin_port = free_port()
    replica = start_replica(tiny_llama, workdir / "store", workdir, "shared",
                            extra_args=("--adapter-import-dir", str(lora_imports), "--admin-port", str(admin_port)))
    yield Server(replica, f"http://127.0.0.1:{admin_port}", workdir / "store", lora_imports)
    stop(replica)
