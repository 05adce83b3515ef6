"""TrainConfig: every knob of one training run, loadable from YAML/JSON and CLI flags.

The resolved config is written next to the adapter (`train_config.yaml`) so a run can be
repeated with `adaptserve train --config OUT/train_config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from adapters.manifest import Task
from adapters.package import NAME_PATTERN
from trainer.prompt_format import PROMPT_FORMAT_CHOICES, PromptFormatChoice

Method = Literal["lora", "rslora", "dora", "ia3", "prompt-tuning", "last-n-layers"]
METHODS: tuple[str, ...] = ("lora", "rslora", "dora", "ia3", "prompt-tuning", "last-n-layers")
CONFIG_FILE_NAME = "train_config.yaml"


@dataclass
class TrainConfig:
    train_file: str
    output_dir: str
    task: Task | Literal["image-classify"] = "generate"  # image-classify: trainer/vision.py, served as classify
    validation_file: str | None = None  # held out; split off train_file when absent
    validation_fraction: float = 0.1
    name: str | None = None  # adapter name; defaults to the output folder's name
    base: str = "smollm2-135m-instruct"  # built-in name, local folder or hub id
    method: Method = "lora"
    # LoRA family
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    # prompt tuning / last-N layers
    num_virtual_tokens: int = 16
    last_n_layers: int = 2
    quantize: Literal["none", "nf4"] = "none"  # QLoRA: nf4 base via bitsandbytes
    # generation: auto = {"input","target"}/{"prompt","completion"} rows raw, "messages" rows chat
    prompt_format: PromptFormatChoice = "auto"
    # optimisation
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    gradient_accumulation: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_length: int = 256
    eval_steps: int = 50
    early_stopping_patience: int = 0  # 0 = off; otherwise evaluations without improvement
    seeds: list[int] = field(default_factory=lambda: [0])
    resume: bool = False
    # evaluation
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    evaluate_base: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch default

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in ("generate", "classify", "image-classify"):
            problems.append(f"task must be 'generate', 'classify' or 'image-classify', got {self.task!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            problems.append("validation_fraction must be between 0 and 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.prompt_format not in PROMPT_FORMAT_CHOICES:
            problems.append(f"prompt_format must be one of {', '.join(PROMPT_FORMAT_CHOICES)}, got {self.prompt_format!r}")
        if self.quantize not in ("none", "nf4"):
            problems.append(f"quantize must be 'none' or 'nf4', got {self.quantize!r}")
        if self.quantize == "nf4" and self.method in ("last-n-layers",):
            problems.append("--quantize nf4 needs an adapter method; last-n-layers trains the base itself")
        if not self.seeds:
            problems.append("at least one seed is needed")
        if not NAME_PATTERN.match(self.adapter_name):
            problems.append(
                f"adapter name {self.adapter_name!r} (from --name or the output folder) must match {NAME_PATTERN.pattern}"
            )
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def adapter_name(self) -> str:
        return self.name or Path(self.output_dir).name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, directory: Path) -> Path:
        path = directory / CONFIG_FILE_NAME
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> "TrainConfig":
        """Config file values, then every override that was actually given (not None)."""
        values: dict[str, Any] = {}
        if config_file:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of option -> value")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        missing = [k for k in ("train_file", "output_dir") if not values.get(k)]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)}")
        return cls(**values)
