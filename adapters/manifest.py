"""AdapterManifest: what adaptserve knows about one immutable adapter version.

Written as `manifest.json` beside `adapter_config.json` and `adapter_model.safetensors`
(by the trainer, and by the store when it publishes a version). A plain PEFT folder without
one gets a manifest derived from its files when it is read.

`prompt_format` records how the trainer rendered generation prompts, so the server can tell
a request in the trained shape from one in the other. It is None for adapters made
elsewhere and for manifests written before it existed: the server then serves every
request exactly as sent, without any check.
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
PromptKind = Literal["raw", "chat"]
PROMPT_KINDS: tuple[str, ...] = ("raw", "chat")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptFormat:
    """How training turned a row into the tokens before the answer.

    raw:  the prompt text as is, tokenized the way the server tokenizes a request's `prompt`
          (the tokenizer's own special tokens, e.g. a BOS, included).
    chat: the prompt turns through the base's chat template with the generation prompt,
          exactly what the server does with a request's `messages`.
    """

    kind: PromptKind
    source: str | None = None  # the rows' shape: "input/target", "prompt/completion" or "messages"
    roles: tuple[str, ...] = ()  # chat: roles of the prompt turns seen in training, in CHAT_ROLES order
    # chat: the system message every training row began with. None when no row had one (the
    # template's own default applied) or when rows had different ones ("system" in roles).
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"prompt_format.kind must be one of {PROMPT_KINDS}, got {self.kind!r}")
        unknown = [r for r in self.roles if r not in CHAT_ROLES]
        if unknown:
            raise ValueError(f"prompt_format.roles has unknown role(s) {unknown}")

    @property
    def source_keys(self) -> str:
        """The training rows' keys as a data file spells them: '{"input", "target"}'."""
        if self.source is None:
            return "{?}"
        return "{" + ", ".join(f'"{key}"' for key in self.source.split("/")) + "}"

    @property
    def request_field(self) -> str:
        """The request field a caller fills to get the trained behaviour."""
        return "messages" if self.kind == "chat" else "prompt"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "roles": list(self.roles), "system_prompt": self.system_prompt}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptFormat":
        if not isinstance(data, dict):
            raise ValueError(f"prompt_format must be an object, got {type(data).__name__}")
        return cls(kind=data.get("kind"), source=data.get("source"), roles=tuple(data.get("roles") or ()),
                   system_prompt=data.get("system_prompt"))


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
    prompt_format: PromptFormat | None = None  # generate adapters trained by adaptserve; None = unknown
    # Free-form provenance: trainer metrics, data hash, training config, merge recipe.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["labels"] = list(self.labels) if self.labels is not None else None
        data["prompt_format"] = self.prompt_format.to_dict() if self.prompt_format is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["target_modules"] = tuple(values.get("target_modules") or ())
        if values.get("labels") is not None:
            values["labels"] = tuple(str(x) for x in values["labels"])
        if values.get("prompt_format") is not None:
            values["prompt_format"] = PromptFormat.from_dict(values["prompt_format"])
        return cls(**values)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
