"""Rendering the kustomize trees once per session, with the real kustomize.

`kubectl kustomize` (or a standalone `kustomize build`) renders exactly what
`kubectl apply -k` would apply; a re-implementation in Python could drift from it. Without
either binary the rendering tests skip locally and fail under CI, where a silent skip
would hide broken manifests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu", "s3")
# Where the adapter store lives: an RWX claim every replica mounts, or a bucket.
VOLUME_STORE_OVERLAYS = ("gpu", "cpu")
OBJECT_STORE_OVERLAYS = ("s3",)
EXAMPLES = ("gateway", "trainer")

Manifest = dict[str, Any]


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="session")
def render() -> Callable[[Path], list[Manifest]]:
    command = _kustomize_command()
    if command is None:
        # Debian's kubernetes-client is too old (kustomize v2: no components or labels).
        message = (
            "neither kustomize (v5) nor kubectl (1.27+) is on PATH; e.g. "
            "go install sigs.k8s.io/kustomize/kustomize/v5@latest"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rendered: dict[Path, list[Manifest]] = {}

    def _render(root: Path) -> list[Manifest]:
        if root not in rendered:
            result = subprocess.run(
                [*command, str(root)], capture_output=True, text=True, timeout=120, check=False
            )
            assert result.returncode == 0, f"kustomize failed on {root}:\n{result.stderr}"
            rendered[root] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return rendered[root]

    return _render


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The single object of `kind` named `name` (generated ConfigMaps carry a hash suffix)."""
    pattern = re.compile(re.escape(name) + r"(-[a-z0-9]{10})?") if name else None
    found = [
        o for o in objects
        if o["kind"] == kind and (pattern is None or pattern.fullmatch(o["metadata"]["name"]))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
