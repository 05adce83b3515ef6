"""Checking a candidate adapter folder against a base model and limits.

Every check appends to one list of problems; `load_adapter_dir` raises once with all of
them (an uploader fixes everything in one round trip). Nothing here follows a path or id
named inside the adapter (`base_model_name_or_path` is informative only) and nothing
unpickles: weights are read with safetensors alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.package import (
    NAME_PATTERN,
    AdapterInvalid,
    AdapterPackage,
    ClassifierHead,
    LoraModule,
    content_sha256,
)
from adapters.signature import BaseSignature, ConvShape

# Files that would be unpickled by some loader: refused on sight, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Keys that make a loader run code from the adapter's author.
CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "auto_mapping", "custom_code"})
ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
SUPPORTED_TASK_TYPES = {None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"}
# Config fields that change the math in ways this engine does not implement.
UNSUPPORTED_WHEN_SET = {
    "use_dora": "DoRA adapters are not served (PEFT cannot batch them; the slot engine has no magnitude vector)",
    "lora_bias": "LoRA with a bias on lora_B is not served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases such as GPT-2) is not served",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not served",
    "trainable_token_indices": "trainable_token_indices is not served",
    "layer_replication": "layer_replication is not served",
    "megatron_config": "megatron_config is not served",
    "use_qalora": "QALoRA adapters are not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
}
UNSUPPORTED_PEFT_TYPES = {
    "IA3": "IA3 is not served: PEFT ignores adapter_names for IA3, so a mixed batch would silently "
    "get the wrong weights",
    "PROMPT_TUNING": "prompt tuning is not served: PEFT ignores adapter_names for it",
    "P_TUNING": "p-tuning is not served",
    "PREFIX_TUNING": "prefix tuning is not served",
}


def _allowed_config_keys() -> frozenset[str]:
    """Every field PEFT's LoraConfig knows, so adapters from plain PEFT pass as they are."""
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig)) - CODE_KEYS


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 64
    max_file_bytes: int = 512 * 1024 * 1024


def load_adapter_dir(
    directory: Path,
    name: str,
    signature: BaseSignature,
    limits: AdapterLimits = AdapterLimits(),
) -> AdapterPackage:
    """Read and check `directory`; return the package or raise AdapterInvalid with every problem."""
    problems: list[str] = []
    warnings: list[str] = []

    if not NAME_PATTERN.fullmatch(name):
        problems.append(f"name {name!r} must match {NAME_PATTERN.pattern}")

    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{path.name}: pickle-based weight files are refused; use safetensors")
        if path.is_symlink():
            problems.append(f"{path.name}: symbolic links are refused")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        problems.append(f"{WEIGHTS_FILE} is missing")
    config = _read_config(config_path, problems) if config_path.is_file() else None
    if config is not None:
        _check_config(config, signature, limits, problems)
    if config is None or not weights_path.is_file():
        raise AdapterInvalid(name, problems)
    if weights_path.stat().st_size > limits.max_file_bytes:
        raise AdapterInvalid(name, problems + [f"{WEIGHTS_FILE} is larger than {limits.max_file_bytes} bytes"])

    tensors = _read_tensors(weights_path, problems)
    if tensors is None:
        raise AdapterInvalid(name, problems)

    modules, head_tensors = _map_keys(tensors, config, signature, limits, problems)
    head = _check_head(head_tensors, signature, problems)

    task_type = config.get("task_type")
    task = "classify" if task_type == "SEQ_CLS" or head is not None else "generate"
    if task_type == "SEQ_CLS" and head is None:
        problems.append(
            f"task_type SEQ_CLS but no classifier head: modules_to_save must include {signature.head_module!r}"
        )
    if task == "generate" and signature.kind != "decoder":
        problems.append(f"an {signature.kind} base serves classification adapters only (a head in modules_to_save)")
    if not modules and head is None:
        problems.append("the adapter holds no LoRA weights and no head")

    declared_base = config.get("base_model_name_or_path")
    if declared_base and declared_base != signature.canonical_id:
        warnings.append(
            f"adapter names base {declared_base!r}; serving on {signature.canonical_id!r} "
            "(module names and shapes match)"
        )

    labels = _labels(directory, head, problems)
    if problems:
        raise AdapterInvalid(name, problems)

    sha = content_sha256(directory)
    previous = _read_manifest(directory)
    manifest = AdapterManifest(
        name=name,
        version=sha[:12],
        sha256=sha,
        task=task,
        peft_type=str(config.get("peft_type", "LORA")),
        rank=max((m.rank for m in modules.values()), default=0),
        target_modules=_target_list(config.get("target_modules")),
        size_bytes=config_path.stat().st_size + weights_path.stat().st_size,
        base_model=declared_base,
        base_fingerprint=signature.fingerprint,
        labels=labels,
        created_at=previous.created_at if previous and previous.created_at else time.time(),
        # How the trainer formatted prompts: the server checks requests against it.
        prompt_format=previous.prompt_format if previous and task == "generate" else None,
        extra=previous.extra if previous else {},
    )
    return AdapterPackage(manifest, directory, modules, head, tuple(warnings))


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object")
        return None
    return config


def _check_config(config: dict[str, Any], signature: BaseSignature, limits: AdapterLimits, problems: list[str]) -> None:
    for key in sorted(CODE_KEYS & config.keys()):
        if config[key] and not (key == "auto_mapping" and _peft_class_record(config[key])):
            problems.append(f"config key {key!r} is refused: adapters never bring code")
    unknown = sorted(config.keys() - _allowed_config_keys() - CODE_KEYS)
    if unknown:
        problems.append(f"config keys not allowed: {', '.join(unknown)}")

    peft_type = config.get("peft_type")
    if peft_type in UNSUPPORTED_PEFT_TYPES:
        problems.append(UNSUPPORTED_PEFT_TYPES[peft_type])
    elif peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r} is not served (LoRA and rsLoRA are)")
    for key, reason in UNSUPPORTED_WHEN_SET.items():
        if config.get(key):
            problems.append(reason)
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} is not served (only 'none')")
    if config.get("task_type") not in SUPPORTED_TASK_TYPES:
        problems.append(f"task_type {config.get('task_type')!r} is not served (CAUSAL_LM or SEQ_CLS)")

    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool):
        problems.append(f"r must be an integer, got {rank!r}")
    elif not 0 < rank <= limits.max_rank:
        problems.append(f"r={rank} must satisfy 0 < r <= {limits.max_rank}")
    for pattern_rank in (config.get("rank_pattern") or {}).values():
        if not isinstance(pattern_rank, int) or not 0 < pattern_rank <= limits.max_rank:
            problems.append(f"rank_pattern value {pattern_rank!r} must satisfy 0 < r <= {limits.max_rank}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")

    for module in config.get("modules_to_save") or []:
        if module != signature.head_module and module not in ("classifier", "score"):
            problems.append(f"modules_to_save {module!r} is not served (only the classifier head)")

    targets = config.get("target_modules")
    names = signature.adaptable_modules
    # PEFT matches targets against full module names ("model.layers.0.mlp.up_proj": what
    # `all-linear` expands to when saved), so the backbone-prefixed names count too.
    names = names + [f"{signature.backbone_prefix}.{n}" for n in names]
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                regex = re.compile(targets)
            except re.error as exc:
                problems.append(f"target_modules regex does not compile: {exc}")
            else:
                if not any(regex.fullmatch(n) for n in names):
                    problems.append(f"target_modules {targets!r} matches no adaptable module of the base")
    elif isinstance(targets, list):
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                problems.append(f"target module {target!r} does not exist in the base")


def _peft_class_record(auto_mapping: Any) -> bool:
    """PEFT writes `auto_mapping` = {base_model_class, parent_library} for every adapter saved
    without a task type (image classifiers, and any text LoRA made with a bare LoraConfig).
    Naming a transformers class is a record, not code: nothing here imports it."""
    return (isinstance(auto_mapping, dict)
            and set(auto_mapping) <= {"base_model_class", "parent_library"}
            and str(auto_mapping.get("parent_library", "")).startswith("transformers.")
            and str(auto_mapping.get("base_model_class", "")).isidentifier())


def _read_tensors(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt header
        problems.append(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}")
        return None


def _canonical(key: str, signature: BaseSignature) -> str | None:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> `layers.0.q_proj.lora_A.weight`."""
    if not key.startswith("base_model.model."):
        return None
    rest = key[len("base_model.model.") :]
    prefix = signature.backbone_prefix + "."
    return rest[len(prefix) :] if rest.startswith(prefix) else rest


def _pattern_value(peft_name: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rule (`get_pattern_key`): a pattern key matches a module whose full name in the
    model PEFT wrapped (`model.layers.0.self_attn.q_proj`) equals it or ends with `.` + it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", peft_name):
            return value
    return default


def _map_keys(
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    signature: BaseSignature,
    limits: AdapterLimits,
    problems: list[str],
) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    # Canonical module -> its name as PEFT saw it: rank_pattern/alpha_pattern keys match that
    # name, which keeps the backbone prefix (`model.layers.1.mlp.down_proj`).
    peft_names: dict[str, str] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if tensor.dtype not in ALLOWED_DTYPES:
            problems.append(f"{key}: dtype {tensor.dtype} not allowed (float32, float16, bfloat16)")
            continue
        if not torch.isfinite(tensor).all():
            problems.append(f"{key}: contains NaN or Inf")
            continue
        name = _canonical(key, signature)
        if name is None:
            problems.append(f"{key}: unexpected key (PEFT keys start with 'base_model.model.')")
            continue
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
            full = key[len("base_model.model.") :]
            peft_names[match.group(1)] = full[: len(full) - len(name)] + match.group(1)
        elif name.split(".")[0] == signature.head_module:
            head[_head_tensor_name(name, signature)] = tensor
        else:
            problems.append(f"{key}: maps to no module this engine can serve")

    use_rslora = bool(config.get("use_rslora"))
    default_rank = config.get("r") if isinstance(config.get("r"), int) else 0
    default_alpha = config.get("lora_alpha", 8)
    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(pairs.items()):
        if module not in signature.linear_shapes and module not in signature.conv_shapes:
            kinds = "linear or convolution" if signature.conv_shapes else "linear"
            problems.append(f"{module}: not a {kinds} module of the base")
            continue
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: lora_A and lora_B must both be present")
            continue
        if module in signature.conv_shapes:
            flat = _conv_pair(module, pair["A"], pair["B"], signature.conv_shapes[module], problems)
            if flat is None:
                continue
            a, b = flat
            rank = a.shape[0]
        else:
            in_features, out_features = signature.linear_shapes[module]
            a, b = pair["A"], pair["B"]
            rank = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or a.shape[1] != in_features:
                problems.append(f"{module}: lora_A shape {tuple(a.shape)} does not fit [r, {in_features}]")
                continue
            if b.dim() != 2 or tuple(b.shape) != (out_features, rank):
                problems.append(f"{module}: lora_B shape {tuple(b.shape)} does not fit [{out_features}, {rank}]")
                continue
        if not 0 < rank <= limits.max_rank:
            problems.append(f"{module}: rank {rank} must satisfy 0 < r <= {limits.max_rank}")
            continue
        expected_rank = _pattern_value(peft_names[module], config.get("rank_pattern") or {}, default_rank)
        if rank != expected_rank:
            problems.append(f"{module}: tensor rank {rank} differs from the config's r={expected_rank}")
            continue
        alpha = _pattern_value(peft_names[module], config.get("alpha_pattern") or {}, default_alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraModule(a=a, b=b, scale=float(scale))
    return modules, head


def _conv_pair(
    module: str, a: torch.Tensor, b: torch.Tensor, shape: ConvShape, problems: list[str]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's conv LoRA, lora_A [r, in, kh, kw] and lora_B [out, r, 1, 1], checked and flattened
    to the [r, in*kh*kw] and [out, r] every LoraModule holds (delta-W as one matrix, so merges
    treat convolutions like linears; the engine folds A back into a kernel)."""
    if shape.groups != 1:
        problems.append(f"{module}: LoRA on a grouped convolution (groups={shape.groups}, e.g. depthwise) is not served")
        return None
    kh, kw = shape.kernel
    rank = a.shape[0] if a.dim() == 4 else -1
    if a.dim() != 4 or tuple(a.shape[1:]) != (shape.in_channels, kh, kw):
        problems.append(f"{module}: lora_A shape {tuple(a.shape)} does not fit [r, {shape.in_channels}, {kh}, {kw}]")
        return None
    if b.dim() != 4 or tuple(b.shape) != (shape.out_channels, rank, 1, 1):
        problems.append(f"{module}: lora_B shape {tuple(b.shape)} does not fit [{shape.out_channels}, {rank}, 1, 1]")
        return None
    return a.reshape(rank, -1), b.reshape(shape.out_channels, rank)


def _head_tensor_name(name: str, signature: BaseSignature) -> str:
    """`classifier.weight` -> `weight`; with a head inside a container (`classifier.1.weight`) too."""
    rest = name[len(signature.head_module) + 1 :]
    inner = signature.head_linear + "."
    return rest[len(inner) :] if signature.head_linear and rest.startswith(inner) else rest


def _check_head(head: dict[str, torch.Tensor], signature: BaseSignature, problems: list[str]) -> ClassifierHead | None:
    if not head:
        return None
    weight, bias = head.get("weight"), head.get("bias")
    extra = sorted(set(head) - {"weight", "bias"})
    if extra:
        problems.append(f"classifier head has unexpected tensors: {', '.join(extra)}")
    if weight is None or weight.dim() != 2 or weight.shape[1] != signature.hidden_size:
        shape = None if weight is None else tuple(weight.shape)
        problems.append(f"{signature.head_module}.weight shape {shape} does not fit [num_labels, {signature.hidden_size}]")
        return None
    if weight.shape[0] < 2:
        problems.append("a classifier head needs at least 2 labels")
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"{signature.head_module}.bias shape {tuple(bias.shape)} does not fit [{weight.shape[0]}]")
        return None
    return ClassifierHead(weight=weight, bias=bias)


def _read_manifest(directory: Path) -> AdapterManifest | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return AdapterManifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None


def _labels(directory: Path, head: ClassifierHead | None, problems: list[str]) -> tuple[str, ...] | None:
    """Labels in id order: our manifest, else an HF config.json id2label, else LABEL_i."""
    if head is None:
        return None
    count = head.weight.shape[0]
    manifest = _read_manifest(directory)
    labels: list[str] | None = list(manifest.labels) if manifest and manifest.labels else None
    hf_config = directory / "config.json"
    if labels is None and hf_config.is_file():
        try:
            id2label = json.loads(hf_config.read_text(encoding="utf-8")).get("id2label") or {}
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)] or None
        except (ValueError, TypeError, KeyError, AttributeError):
            problems.append("config.json id2label is malformed")
    if labels is None:
        return tuple(f"LABEL_{i}" for i in range(count))
    if len(labels) != count:
        problems.append(f"{len(labels)} labels given but the head has {count} outputs")
    return tuple(labels)


def _target_list(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        return (targets,)
    return tuple(sorted(str(t) for t in targets or ()))
