"""Adapter registry: name -> versions -> state. The only writer of adapter state.

Versions are content-addressed (sha256 of config + weights), so a binding made for one
request can never silently point at other bytes. Validation and file reads run in a worker
thread, never on the event loop and never on the engine thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters.manifest import CONFIG_FILE, AdapterManifest
from adapters.package import AdapterInvalid, AdapterPackage
from adapters.signature import BaseSignature
from adapters.validate import AdapterLimits, load_adapter_dir
from server.contract import AdapterBinding
from server.errors import AdapterNotFound, AdapterVersionNotFound

logger = logging.getLogger(__name__)


class AdapterTier(str, enum.Enum):
    STORED = "stored"  # on disk only
    CPU = "cpu"  # validated tensors in host memory
    DEVICE = "device"  # copied into an engine slot


@dataclass
class AdapterVersion:
    manifest: AdapterManifest
    directory: Path
    package: AdapterPackage | None = None  # present while in the CPU tier
    warnings: tuple[str, ...] = ()
    requests: int = 0
    last_used: float | None = None


@dataclass
class AdapterEntry:
    name: str
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    current: str | None = None


@dataclass(frozen=True)
class RejectedAdapter:
    name: str
    directory: Path
    problems: tuple[str, ...]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`name` or `name@version`."""
    name, _, version = ref.partition("@")
    return name, version or None


class Registry:
    def __init__(self, root: Path, signature: BaseSignature, limits: AdapterLimits):
        self.root = root
        self.signature = signature
        self.limits = limits
        self.entries: dict[str, AdapterEntry] = {}
        self.rejected: dict[str, RejectedAdapter] = {}

    def scan(self) -> None:
        """Register every PEFT adapter folder under root; invalid ones are logged and skipped."""
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (directory / CONFIG_FILE).exists():
                self._register_folder(directory.name, directory)

    def _register_folder(self, name: str, directory: Path) -> None:
        try:
            package = load_adapter_dir(directory, name, self.signature, self.limits)
        except AdapterInvalid as exc:
            self.rejected[name] = RejectedAdapter(name, directory, tuple(exc.problems))
            logger.warning("adapter %s skipped: %s", name, "; ".join(exc.problems))
            return
        for warning in package.warnings:
            logger.warning("adapter %s: %s", name, warning)
        version = package.manifest.version
        entry = self.entries.setdefault(name, AdapterEntry(name))
        entry.versions[version] = AdapterVersion(package.manifest, directory, package, package.warnings)
        entry.current = version
        self.rejected.pop(name, None)
        logger.info("adapter %s registered (%s, r=%d, %s)", package.manifest.ref, package.manifest.task,
                    package.manifest.rank, package.manifest.peft_type)

    def lookup(self, ref: str) -> AdapterVersion:
        name, version = parse_ref(ref)
        entry = self.entries.get(name)
        if entry is None or entry.current is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="adapter")
        chosen = entry.versions.get(version or entry.current)
        if chosen is None:
            raise AdapterVersionNotFound(f"adapter {name!r} has no version {version!r}", param="adapter")
        return chosen

    async def bind(self, ref: str) -> AdapterBinding:
        """Resolve `ref` to one immutable version, reading it into the CPU tier if needed."""
        chosen = self.lookup(ref)
        if chosen.package is None:
            chosen.package = await asyncio.to_thread(
                load_adapter_dir, chosen.directory, chosen.manifest.name, self.signature, self.limits
            )
        chosen.requests += 1
        chosen.last_used = time.time()
        manifest = chosen.manifest
        return AdapterBinding(manifest.name, manifest.version, manifest.sha256, chosen.package)
