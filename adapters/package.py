"""Reading a PEFT adapter folder into an AdapterPackage, checking it on the way.

`load_adapter_dir` is the one entry point: it opens only safetensors (never pickle),
collects every problem it finds (see validate.py) and either returns a package whose
tensors are ready to copy into the engine, or raises AdapterInvalid listing them all.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: delta_W = scale * B @ A."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class ClassifierHead:
    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor | None  # [num_labels]


@dataclass(frozen=True)
class AdapterPackage:
    manifest: AdapterManifest
    directory: Path | None  # None: built in memory (a per-request merge)
    modules: dict[str, LoraModule]  # canonical module name -> weights
    head: ClassifierHead | None
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Content identity: every cache keys by this, never by name."""
        return self.manifest.sha256

    @property
    def nbytes(self) -> int:
        total = sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())
        if self.head is not None:
            total += self.head.weight.nbytes + (self.head.bias.nbytes if self.head.bias is not None else 0)
        return total


def content_sha256(directory: Path) -> str:
    """sha256 over adapter_config.json bytes then adapter_model.safetensors bytes."""
    digest = hashlib.sha256()
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        with open(directory / filename, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class AdapterInvalid(Exception):
    """Raised once with every problem found, so an uploader fixes them all in one go."""

    def __init__(self, name: str, problems: list[str]):
        self.name = name
        self.problems = problems
        super().__init__(f"adapter {name!r} is invalid: " + "; ".join(problems))
