"""`adaptserve export`: one adapter merged into its base, saved as a standalone HF model.

The adapter is validated exactly as the server validates it (safetensors only, no code,
shapes against the base), then PEFT's `merge_and_unload` folds delta-W into an
unquantized fp32 copy of the base, so the export runs anywhere transformers runs, with no
adapter machinery. A quantized serving base cannot be merged into without re-quantizing
the sum, so the export is always full precision; when the server serves on a quantized
base (`--serving-quantization`), the difference between the two is measured and reported
(relative logit error and greedy next-token agreement on probe texts) instead of assumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from adapters.bases import default_cache_dir, resolve_base
from adapters.manifest import CONFIG_FILE
from adapters.package import AdapterPackage
from adapters.signature import BaseSignature
from adapters.store import LocalStore
from adapters.validate import AdapterLimits, load_adapter_dir

logger = logging.getLogger(__name__)

REPORT_FILE = "adaptserve_export.json"
PROBES = (
    "The capital of France is",
    "Write a short note about adapters:",
    "select name from users where",
    "I love this product because",
)


@dataclass(frozen=True)
class ExportReport:
    adapter: str  # name@version
    base: str
    out: str
    task: str
    serving_quantization: str
    # Served (quantized base + LoRA) vs exported (fp32 merged) on PROBES; None when unquantized.
    drift_relative_logit_error: float | None = None
    drift_next_token_agreement: float | None = None


def _model_class(task_type: str | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM


def _load_base(path: Path, task_type: str | None, labels: Sequence[str] | None, quantization: str = "none"):
    kwargs: dict = {"dtype": torch.float32}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "nf4", load_in_8bit=quantization == "int8",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    return _model_class(task_type).from_pretrained(path, **kwargs).eval()


def signature_of(model, canonical_id: str) -> BaseSignature:
    """What validation checks an adapter against, read off an HF *ForCausalLM / *ForSequenceClassification."""
    prefix = model.base_model_prefix
    backbone = model.get_submodule(prefix)
    head = next((n for n in ("score", "classifier") if isinstance(getattr(model, n, None), torch.nn.Linear)), "score")
    architectures = getattr(model.config, "architectures", None) or []
    decoder = any(a.endswith("ForCausalLM") for a in architectures) or bool(getattr(model.config, "is_decoder", False))
    return BaseSignature(
        canonical_id=canonical_id,
        kind="decoder" if decoder else "encoder",
        backbone_prefix=prefix,
        hidden_size=int(model.config.hidden_size),
        linear_shapes={n: (m.in_features, m.out_features) for n, m in backbone.named_modules()
                       if isinstance(m, torch.nn.Linear)},
        head_module=head,
        head_has_bias=getattr(getattr(model, head, None), "bias", None) is not None,
    )


def resolve_adapter(spec: str, adapters_dir: Path) -> tuple[str, Path]:
    """`name`, `name@version` (from the store) or a folder path -> (name, folder)."""
    folder = Path(spec)
    if (folder / CONFIG_FILE).is_file():
        return folder.name.lower(), folder
    name, _, version = spec.partition("@")
    stored = LocalStore(adapters_dir).snapshot().get(name)
    if stored is None:
        raise SystemExit(f"adapter {name!r} is not in the store {adapters_dir}")
    chosen = stored.versions.get(version or stored.current)
    if chosen is None:
        raise SystemExit(f"adapter {name!r} has no version {version!r}")
    return name, chosen.directory


def export_merged(adapter_dir: Path, name: str, base: str, out_dir: Path, cache_dir: Path | None = None,
                  serving_quantization: str = "none") -> ExportReport:
    from peft import PeftModel
    from transformers import AutoTokenizer

    resolved = resolve_base(base, cache_dir or default_cache_dir())
    task_type = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("task_type")
    model = _load_base(resolved.path, task_type, None)
    # The server's checks (no pickle, no code, shapes), without its rank cap: an export runs offline.
    package = load_adapter_dir(adapter_dir, name, signature_of(model, resolved.canonical_id), AdapterLimits(1024))
    labels = package.manifest.labels
    if labels:
        model = _load_base(resolved.path, task_type, labels)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    tokenizer.save_pretrained(out_dir)

    report = ExportReport(package.manifest.ref, resolved.canonical_id, str(out_dir), package.manifest.task,
                          serving_quantization)
    if serving_quantization != "none":
        error, agreement = _drift(merged, resolved.path, adapter_dir, task_type, package, tokenizer,
                                  serving_quantization)
        report = ExportReport(**{**asdict(report), "drift_relative_logit_error": error,
                                 "drift_next_token_agreement": agreement})
        logger.warning("the server serves %s on a %s base; this export is fp32-merged: relative logit error "
                       "%.3g, next-token agreement %.0f%% on %d probes", report.adapter, serving_quantization,
                       error, agreement * 100, len(PROBES))
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return report


@torch.no_grad()
def _drift(merged, base_path: Path, adapter_dir: Path, task_type: str | None, package: AdapterPackage, tokenizer,
           quantization: str) -> tuple[float, float]:
    """Served (quantized base + unmerged LoRA) against exported (fp32 merged), on PROBES."""
    from peft import PeftModel

    served = PeftModel.from_pretrained(
        _load_base(base_path, task_type, package.manifest.labels, quantization), adapter_dir
    ).eval()
    num = den = 0.0
    agree = 0
    for text in PROBES:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        exported_logits = merged(input_ids=ids).logits[0].float()  # [tokens, vocab] or [labels]
        served_logits = served(input_ids=ids.to(served.device)).logits[0].float().cpu()
        num += float((served_logits - exported_logits).pow(2).sum())
        den += float(exported_logits.pow(2).sum())
        agree += int(served_logits.reshape(-1, exported_logits.shape[-1])[-1].argmax()
                     == exported_logits.reshape(-1, exported_logits.shape[-1])[-1].argmax())
    return (num / den) ** 0.5, agree / len(PROBES)


def _default_adapters_dir() -> Path:
    # The server's default store (server/config.py), without importing the server.
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("ADAPTSERVE_ADAPTERS_DIR") or Path(data) / "adaptserve" / "adapters")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptserve export", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="name, name@version (from the store) or a PEFT folder")
    parser.add_argument("--out", required=True, type=Path, help="directory for the merged HF model")
    parser.add_argument("--base-model", default=os.environ.get("ADAPTSERVE_BASE_MODEL", "smollm2-135m-instruct"))
    parser.add_argument("--adapters-dir", type=Path, default=_default_adapters_dir())
    parser.add_argument("--cache-dir", type=Path, default=None, help="converted bases (default: the server's)")
    parser.add_argument("--serving-quantization", choices=("none", "int8", "nf4"), default="none",
                        help="the quantization the server serves with: measure the export's drift from it")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    name, folder = resolve_adapter(args.adapter, args.adapters_dir)
    report = export_merged(folder, name, args.base_model, args.out, args.cache_dir and args.cache_dir / "bases",
                           args.serving_quantization)
    print(json.dumps(asdict(report), indent=2))
    return 0
