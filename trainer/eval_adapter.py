"""`eval`: held-out metrics for an existing adapter folder (or the bare base), base beside.

Generation rows are asked in the prompt format the adapter's manifest records (or by
trainer/prompt_format.py's rule when it records none), as the server is asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import set_seed

from adapters.bases import resolve_base
from adapters.manifest import MANIFEST_FILE, AdapterManifest
from trainer.data import load_examples
from trainer.evaluation import evaluate_classification, evaluate_generation
from trainer.models import load_adapter, load_base_model, load_tokenizer
from trainer.prompt_format import in_format


def evaluate_adapter(
    data_file: str,
    adapter_dir: str | None = None,
    base: str | None = None,
    task: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics on every example of `data_file`: {"base": ..., "adapter": ...} ("adapter" only with one)."""
    manifest = _manifest(Path(adapter_dir)) if adapter_dir else None
    task = task or (manifest.task if manifest else None)
    if task is None:
        raise ValueError("--task is needed when evaluating the bare base")
    base_name = base or (manifest.base_model if manifest and manifest.base_model else None) or _peft_base(adapter_dir) or "smollm2-135m-instruct"
    resolved = resolve_base(base_name)
    examples = load_examples(data_file, task)
    if task == "generate":
        examples = in_format(examples, manifest.prompt_format if manifest else None)
    labels = _labels(task, manifest, examples, data_file)

    tokenizer = load_tokenizer(resolved)
    set_seed(seed)  # a classifier's base head is freshly initialised: make its score repeatable
    model = load_base_model(resolved, task, tokenizer, labels)

    def measure(current) -> dict[str, Any]:
        if task == "classify":
            return evaluate_classification(current, tokenizer, examples, labels, batch_size=batch_size, max_length=max_length)
        return evaluate_generation(current, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)

    results = {"base_model": resolved.canonical_id, "task": task, "base": measure(model)}
    if adapter_dir:
        results["adapter"] = measure(load_adapter(model, Path(adapter_dir)))
    return results


def _labels(task: str, manifest: AdapterManifest | None, examples, data_file: str) -> list[str] | None:
    if task != "classify":
        return None
    seen = {e.label for e in examples}
    if manifest is None or not manifest.labels:
        return sorted(seen)
    unknown = sorted(seen - set(manifest.labels))
    if unknown:
        raise ValueError(f"{data_file}: label(s) {unknown} are not among the adapter's labels {list(manifest.labels)}")
    return list(manifest.labels)


def _manifest(directory: Path) -> AdapterManifest | None:
    path = directory / MANIFEST_FILE
    return AdapterManifest.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _peft_base(adapter_dir: str | None) -> str | None:
    if not adapter_dir:
        return None
    config_path = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config_path.read_text()).get("base_model_name_or_path") if config_path.is_file() else None
