"""AdapterManifest: what adaptserve knows about one immutable adapter version.

Written as `manifest.json` beside `adapter_config.json` and `adapter_model.safetensors`
(by the trainer, and by the store when it publishes a version). A plain PEFT folder without
one gets a manifest derived from its files when it is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

Task = Literal["generate", "classify"]


@dataclass(frozen=True)
class AdapterManifest:
    name: str
    version: str  # first 12 hex digits of sha256: short, stable, content-addressed
    sha256: str  # over adapter_config.json bytes + adapter_model.safetensors bytes
    task: Task
    peft_type: str
    rank: int  # largest r over all modules (rank_pattern may lower some)
    target_modules: tuple[str, ...]
    size_bytes: int
    base_model: str | None = None  # the base the adapter names (hub id or path); informative only
    base_fingerprint: str | None = None  # adaptserve's fingerprint of the base it was checked against
    labels: tuple[str, ...] | None = None  # classify adapters: id -> label, in order
    created_at: float | None = None
    # Free-form provenance: trainer metrics, data hash, training config, merge recipe.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["labels"] = list(self.labels) if self.labels is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["target_modules"] = tuple(values.get("target_modules") or ())
        if values.get("labels") is not None:
            values["labels"] = tuple(str(x) for x in values["labels"])
        return cls(**values)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
