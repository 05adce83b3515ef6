"""Combining LoRA adapters into one adapter, without retraining.

Every source i (weight w_i) contributes delta_W_i = s_i * B_i @ A_i per module; the target
is delta_W = sum_i w_i * delta_W_i. Methods:

- `cat` (exact): A = [A_1; A_2; ...] ([sum r_i, in]), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
  ([out, sum r_i]), scale 1. Ranks may differ; nothing is approximated.
- `linear`: the weighted delta-W re-factored by SVD; default rank sum r_i, which is exact
  (delta-W has rank <= sum r_i) but orthogonal, so a smaller `rank` compresses it.
- `svd`: the same, truncated to `rank` (default max r_i: the size of one source).
- `ties`, `dare_linear`, `dare_ties`: PEFT's task-arithmetic rules (trim by magnitude +
  sign election; random drop with rescale; both) applied to each source's delta-W, then
  truncated SVD to `rank` (default max r_i). Unlike PEFT's `add_weighted_adapter` they
  act on delta-W, not on A and B separately, so sources of different ranks combine.

Classifier heads are full weights, not deltas: they merge only when every source has the
same labels, as the convex combination sum_i (w_i / sum w) * head_i.

The result is an AdapterPackage (serves like any other) plus `write_peft_dir`, which saves
a real PEFT folder that `load_adapter_dir` and PEFT itself load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import torch
from safetensors.torch import save_file

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.package import AdapterPackage, ClassifierHead, LoraModule
from adapters.signature import BaseSignature

MergeMethod = Literal["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)
SPARSIFYING = ("ties", "dare_linear", "dare_ties")
# Far past any useful mix, and small enough that weighted deltas stay finite in float32
# (1e308 is a finite float64 but inf once the SVD's float32 sees it: a 500 before this bound).
MAX_WEIGHT = 1e3
DEFAULT_DENSITY = 0.5


class MergeError(ValueError):
    """The sources cannot be combined as asked (mixed tasks, disagreeing heads, bad parameters)."""


@dataclass(frozen=True)
class MergeSpec:
    method: MergeMethod = "cat"
    density: float | None = None  # ties/dare: fraction of each delta-W kept (default 0.5)
    rank: int | None = None  # svd family: rank of the result (default: see the module docstring)
    majority_sign: Literal["total", "frequency"] = "total"  # ties/dare_ties sign election
    seed: int = 0  # dare's random drop, so one recipe always gives the same adapter

    def problems(self) -> list[str]:
        found = []
        if self.method not in MERGE_METHODS:
            found.append(f"merge method {self.method!r} is not one of {', '.join(MERGE_METHODS)}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            found.append(f"density={self.density} must satisfy 0 < density <= 1")
        if self.density is not None and self.method not in SPARSIFYING:
            found.append(f"density applies to {', '.join(SPARSIFYING)}, not {self.method}")
        if self.rank is not None and self.rank < 1:
            found.append(f"rank={self.rank} must be >= 1")
        if self.rank is not None and self.method == "cat":
            found.append("cat is exact at rank sum r_i; `rank` applies to the svd-family methods")
        return found


@dataclass(frozen=True)
class MergeSource:
    package: AdapterPackage
    weight: float


@dataclass(frozen=True)
class MergeResult:
    package: AdapterPackage
    recipe: dict[str, Any]
    relative_error: float  # ||delta_W - sum w_i delta_W_i||_F / ||sum w_i delta_W_i||_F over all modules


def recipe_for(sources: Sequence[MergeSource], spec: MergeSpec) -> dict[str, Any]:
    """What identifies a merge: the method, its parameters and each source's content hash."""
    recipe: dict[str, Any] = {
        "method": spec.method,
        "sources": [
            {"name": s.package.manifest.name, "version": s.package.manifest.version,
             "sha256": s.package.key, "weight": float(s.weight)}
            for s in sources
        ],
    }
    if spec.method in SPARSIFYING:
        recipe["density"] = spec.density if spec.density is not None else DEFAULT_DENSITY
    if spec.method in ("ties", "dare_ties"):
        recipe["majority_sign"] = spec.majority_sign
    if spec.method.startswith("dare"):
        recipe["seed"] = spec.seed
    if spec.method != "cat":
        recipe["rank"] = spec.rank
    return recipe


def recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def merged_rank(sources: Sequence[MergeSource], spec: MergeSpec) -> int:
    """The largest rank the result can have, known before any tensor is touched (for caps)."""
    ranks = [s.package.manifest.rank for s in sources]
    if spec.method == "cat" or (spec.method == "linear" and spec.rank is None):
        return sum(ranks)
    return spec.rank if spec.rank is not None else max(ranks)


def merge_adapters(name: str, sources: Sequence[MergeSource], spec: MergeSpec) -> MergeResult:
    """Combine `sources` into one adapter named `name`; raises MergeError listing every problem."""
    problems = spec.problems()
    if not sources:
        problems.append("a merge needs at least one source adapter")
    tasks = {s.package.manifest.task for s in sources}
    if len(tasks) > 1:
        problems.append("sources mix generation and classification adapters")
    for s in sources:
        if not math.isfinite(s.weight) or abs(s.weight) > MAX_WEIGHT:
            problems.append(f"weight of {s.package.manifest.ref} must be finite and within ±{MAX_WEIGHT:g}")
    if problems:
        raise MergeError("; ".join(problems))
    head = _merge_heads(sources)

    modules: dict[str, LoraModule] = {}
    for module in sorted({m for s in sources for m in s.package.modules}):
        present = [(s.package.modules[module], s.weight) for s in sources if module in s.package.modules]
        modules[module] = _cat(present) if spec.method == "cat" else _via_delta(present, spec)
    modules = _pad_to_one_rank(modules)

    recipe = recipe_for(sources, spec)
    key = recipe_key(recipe)
    error = relative_error(modules, sources)
    first = sources[0].package.manifest
    manifest = AdapterManifest(
        name=name, version=key[:12], sha256=key, task=first.task, peft_type="LORA",
        rank=max((m.rank for m in modules.values()), default=0),
        target_modules=_target_names(modules, None), size_bytes=_tensor_bytes(modules, head),
        base_model=first.base_model, base_fingerprint=first.base_fingerprint, labels=first.labels,
        created_at=time.time(), extra={"merge": {**recipe, "relative_error": error}},
    )
    return MergeResult(AdapterPackage(manifest, None, modules, head), recipe, error)


def _cat(present: list[tuple[LoraModule, float]]) -> LoraModule:
    a = torch.cat([m.a.float() for m, _ in present], dim=0)  # [sum r, in]
    b = torch.cat([m.b.float() * (w * m.scale) for m, w in present], dim=1)  # [out, sum r]
    return LoraModule(a=a, b=b, scale=1.0)


def delta_weight(module: LoraModule) -> torch.Tensor:
    return module.scale * (module.b.float() @ module.a.float())  # [out, in]


def _via_delta(present: list[tuple[LoraModule, float]], spec: MergeSpec) -> LoraModule:
    from peft.utils import merge_utils  # PEFT's TIES/DARE rules are the reference; reuse them

    deltas = [delta_weight(m) for m, _ in present]
    weights = torch.tensor([w for _, w in present], dtype=torch.float32)
    density = spec.density if spec.density is not None else DEFAULT_DENSITY
    if spec.method in ("linear", "svd"):
        delta = merge_utils.task_arithmetic(deltas, weights)
    elif spec.method == "ties":
        delta = merge_utils.ties(deltas, weights, density, spec.majority_sign)
    else:
        # DARE drops with torch's global RNG: fork it, so the seed fixes the result and
        # nothing else in the process sees its state move.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            if spec.method == "dare_linear":
                delta = merge_utils.dare_linear(deltas, weights, density)
            else:
                delta = merge_utils.dare_ties(deltas, weights, density, spec.majority_sign)
    ranks = [m.rank for m, _ in present]
    default = sum(ranks) if spec.method == "linear" else max(ranks)
    rank = min(spec.rank or default, *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    # Singular values split evenly between the factors keeps A and B on one scale.
    root = s[:rank].sqrt()
    return LoraModule(a=(root[:, None] * vh[:rank]).contiguous(), b=(u[:, :rank] * root).contiguous(), scale=1.0)


def _pad_to_one_rank(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """Zero rows of A / columns of B up to one r, so the config needs no per-module rank_pattern
    (whose keys are regexes that loaders match differently); zeros add exactly nothing."""
    rank = max((m.rank for m in modules.values()), default=0)
    padded = {}
    for name, m in modules.items():
        extra = rank - m.rank
        if extra:
            m = LoraModule(a=torch.nn.functional.pad(m.a, (0, 0, 0, extra)),
                           b=torch.nn.functional.pad(m.b, (0, extra)), scale=m.scale)
        padded[name] = m
    return padded


def _merge_heads(sources: Sequence[MergeSource]) -> ClassifierHead | None:
    heads = [s.package.head for s in sources]
    if all(h is None for h in heads):
        return None
    labels = {s.package.manifest.labels for s in sources}
    shapes = {tuple(h.weight.shape) if h is not None else None for h in heads}
    if any(h is None for h in heads) or len(labels) != 1 or len(shapes) != 1:
        raise MergeError("classifier heads disagree (labels or shape differ): classify merges need the same labels")
    total = sum(s.weight for s in sources)
    if total == 0:
        raise MergeError("classifier heads are averaged with weights / sum(weights); the weights sum to 0")
    weight = sum((s.weight / total) * s.package.head.weight.float() for s in sources)
    biases = [s.package.head.bias for s in sources]
    bias = None
    if all(b is not None for b in biases):
        bias = sum((s.weight / total) * s.package.head.bias.float() for s in sources)
    elif any(b is not None for b in biases):
        raise MergeError("classifier heads disagree: some have a bias, some do not")
    return ClassifierHead(weight=weight, bias=bias)


def exact_delta(sources: Sequence[MergeSource]) -> dict[str, torch.Tensor]:
    """sum_i w_i delta_W_i per module: what every method approximates (and cat equals)."""
    total: dict[str, torch.Tensor] = {}
    for s in sources:
        for name, module in s.package.modules.items():
            d = s.weight * delta_weight(module)
            total[name] = total[name] + d if name in total else d
    return total


def relative_error(modules: dict[str, LoraModule], sources: Sequence[MergeSource]) -> float:
    """Frobenius relative error of the merged delta-W against the exact weighted sum, all modules pooled."""
    exact = exact_delta(sources)
    num = sum(float((delta_weight(modules[n]) - d).pow(2).sum()) for n, d in exact.items())
    den = sum(float(d.pow(2).sum()) for d in exact.values())
    return math.sqrt(num / den) if den > 0 else 0.0


def _tensor_bytes(modules: dict[str, LoraModule], head: ClassifierHead | None) -> int:
    total = sum(m.a.nbytes + m.b.nbytes for m in modules.values())
    if head is not None:
        total += head.weight.nbytes + (head.bias.nbytes if head.bias is not None else 0)
    return total


def _target_names(modules: dict[str, LoraModule], signature: BaseSignature | None) -> tuple[str, ...]:
    """Leaf names (`q_proj`) when the adapter covers every module of that kind in the base;
    otherwise full canonical names, so PEFT adds LoRA exactly where there are weights."""
    if signature is None:
        return tuple(sorted({n.rsplit(".", 1)[-1] for n in modules}))
    leaves = {n.rsplit(".", 1)[-1] for n in modules}
    complete = all(
        all(n in modules for n in signature.adaptable_modules if n.rsplit(".", 1)[-1] == leaf) for leaf in leaves
    )
    return tuple(sorted(leaves)) if complete else tuple(sorted(modules))


def write_peft_dir(package: AdapterPackage, directory: Path, signature: BaseSignature) -> None:
    """Save `package` as a PEFT LoRA folder (config + safetensors + manifest with the recipe).

    Keys follow PEFT's saved layout, which `validate._canonical` reverses:
    `base_model.model.<backbone_prefix>.<module>.lora_A.weight` and, for a head,
    `base_model.model.<head_module>.weight`. Every module has one r and alpha = r (the
    scale is folded into B), so the file means the same to PEFT and to adaptserve.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"base_model.model.{signature.backbone_prefix}." if signature.backbone_prefix else "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    for name, m in package.modules.items():
        if m.scale != 1.0:
            m = LoraModule(a=m.a, b=m.b * m.scale, scale=1.0)
        a, b = m.a.float(), m.b.float()
        conv = signature.conv_shapes.get(name)
        if conv is not None:  # back to PEFT's conv layout: A [r, in, kh, kw], B [out, r, 1, 1]
            a = a.reshape(m.rank, conv.in_channels, *conv.kernel)
            b = b.reshape(conv.out_channels, m.rank, 1, 1)
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
    if package.head is not None:
        head = ".".join(filter(None, [signature.head_module, signature.head_linear]))
        tensors[f"base_model.model.{head}.weight"] = package.head.weight.float().contiguous()
        if package.head.bias is not None:
            tensors[f"base_model.model.{head}.bias"] = package.head.bias.float().contiguous()
    rank = max((m.rank for m in package.modules.values()), default=1)
    config = {
        "peft_type": "LORA",
        # PEFT's SEQ_CLS wrapper feeds input_ids; image classifiers are wrapped without a task type.
        "task_type": None if signature.kind == "vision" else "SEQ_CLS" if package.head is not None else "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(_target_names(package.modules, signature)),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": signature.canonical_id,
        "modules_to_save": [signature.head_module] if package.head is not None else None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    # The manifest carries the recipe (and labels) into load_adapter_dir; its version and
    # sha256 are recomputed there from the files written above.
    package.manifest.write(directory)
