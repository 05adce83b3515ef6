"""The output folder's documents: manifest.json, report.json, report.md, loss and metric plots.

The report names the request shape the adapter was trained on and shows, as curl and
`openai` calls, the exact request `adaptserve eval --server` sends for a held-out row, so its
metric can be reproduced against a running server. When the held-out rows were split off the
training file, they are written beside it (held_out.jsonl) for that command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest, PromptFormat
from adapters.package import content_sha256
from trainer.data import to_row
from trainer.evaluation import HEADLINE_METRIC
from trainer.methods import SERVING_SUPPORT, serving_summary
from trainer.serving_request import (
    DEFAULT_SERVER,
    NATIVE,
    OPENAI,
    classification_request,
    curl_command,
    generation_request,
    openai_snippet,
)
from trainer.training import TrainingOutcome

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss.png"
METRICS_PLOT = "metrics.png"
HELD_OUT_FILE = "held_out.jsonl"  # written only when the held-out rows were split off the training file


def write_outputs(outcome: TrainingOutcome) -> dict[str, Any]:
    """Writes manifest (for real adapters), report.json, report.md and plots; returns the report."""
    directory = Path(outcome.config.output_dir)
    report = build_report(outcome)
    if (directory / CONFIG_FILE).is_file():
        manifest = build_manifest(outcome, directory, report)
        manifest.write(directory)
        report["adapter"] = {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256, "size_bytes": manifest.size_bytes}
    if not outcome.config.validation_file and outcome.config.task != "image-classify":
        (directory / HELD_OUT_FILE).write_text("".join(json.dumps(to_row(e)) + "\n" for e in outcome.data.held_out))
    plot_loss(outcome, directory / LOSS_PLOT)
    if outcome.base_metrics is not None:
        plot_metrics_vs_base(outcome, directory / METRICS_PLOT)
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (directory / REPORT_MD).write_text(render_markdown(report))
    return report


def build_report(outcome: TrainingOutcome) -> dict[str, Any]:
    config, best = outcome.config, outcome.best
    return {
        "name": config.adapter_name,
        "task": config.task,
        "method": config.method,
        "serving": {"level": SERVING_SUPPORT[config.method].level, "reason": SERVING_SUPPORT[config.method].reason},
        "base_model": outcome.base.canonical_id,
        "headline_metric": HEADLINE_METRIC[config.task],
        "metrics": best.metrics,
        "base_metrics": outcome.base_metrics,
        "seeds": [
            {"seed": r.seed, "metrics": _scalars(r.metrics), "wall_seconds": r.wall_seconds, "peak_memory_bytes": r.peak_memory_bytes}
            for r in outcome.runs
        ],
        "best_seed": best.seed,
        "summary": outcome.summary(),
        "trainable_parameters": best.trainable_parameters,
        "total_parameters": best.total_parameters,
        "trainable_percent": 100.0 * best.trainable_parameters / best.total_parameters,
        "peak_memory_bytes": max(r.peak_memory_bytes for r in outcome.runs),
        "wall_seconds": sum(r.wall_seconds for r in outcome.runs),
        "data": {"train_examples": len(outcome.data.train), "held_out_examples": len(outcome.data.held_out), "sha256": outcome.data.sha256, "labels": outcome.data.labels},
        "training_config": config.to_dict(),
        "request": build_request_section(outcome),
        "loss_history": [
            {k: entry[k] for k in ("step", "loss", "eval_loss") if k in entry} for entry in best.log_history
        ],
    }


def build_request_section(outcome: TrainingOutcome) -> dict[str, Any]:
    """How to ask the served adapter: the trained request shape, one held-out row as curl and
    openai, and the command that measures the whole held-out set through a server."""
    config, data = outcome.config, outcome.data
    name, example = config.adapter_name, data.held_out[0]
    held_out_file = config.validation_file or str(Path(config.output_dir) / HELD_OUT_FILE)
    if config.task == "image-classify":
        from trainer.vision import image_request_section

        return image_request_section(outcome)
    if config.task == "classify":
        native, openai = classification_request([example], name), None
        field, reference = "inputs", example.label
        evaluate = f"adaptserve eval --server {DEFAULT_SERVER} --adapter {name} {held_out_file}"
    else:
        native = generation_request(example, name, config.max_new_tokens, NATIVE)
        openai = generation_request(example, name, config.max_new_tokens, OPENAI)
        field, reference = data.prompt_format.request_field, example.answer
        evaluate = (f"adaptserve eval --server {DEFAULT_SERVER} --adapter {name} {held_out_file} "
                    f"--max-new-tokens {config.max_new_tokens}")
    return {
        "field": field,
        "prompt_format": data.prompt_format.to_dict() if data.prompt_format else None,
        "native": {"path": native.path, "body": native.body},
        "openai": {"path": openai.path, "body": openai.body} if openai else None,
        "curl": curl_command(native),
        "openai_python": openai_snippet(openai) if openai else None,
        "reference": reference,
        "held_out_file": held_out_file,
        "eval_command": evaluate,
    }


def build_manifest(outcome: TrainingOutcome, directory: Path, report: dict[str, Any]) -> AdapterManifest:
    adapter_config = json.loads((directory / CONFIG_FILE).read_text())
    sha256 = content_sha256(directory)
    targets = adapter_config.get("target_modules") or ()
    rank = max([adapter_config.get("r") or 0, *(adapter_config.get("rank_pattern") or {}).values()])
    return AdapterManifest(
        name=outcome.config.adapter_name,
        version=sha256[:12],
        sha256=sha256,
        task="classify" if outcome.config.task == "image-classify" else outcome.config.task,
        peft_type=adapter_config["peft_type"],
        rank=int(rank),
        target_modules=tuple(sorted([targets] if isinstance(targets, str) else targets)),
        size_bytes=(directory / CONFIG_FILE).stat().st_size + (directory / WEIGHTS_FILE).stat().st_size,
        base_model=outcome.base.canonical_id,
        labels=tuple(outcome.data.labels) if outcome.data.labels else None,
        created_at=time.time(),
        prompt_format=outcome.data.prompt_format,
        extra={
            "metrics": _scalars(report["metrics"]),
            "base_metrics": _scalars(report["base_metrics"] or {}),
            "data_sha256": outcome.data.sha256,
            "training_config": outcome.config.to_dict(),
            "trainable_parameters": report["trainable_parameters"],
            "seeds": [s["seed"] for s in report["seeds"]],
            "summary": report["summary"],
            "serving": report["serving"],
        },
    )


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Adapter `{report['name']}`",
        "",
        f"- task: **{report['task']}**, method: **{report['method']}**, base: `{report['base_model']}`",
        f"- serving: **{report['serving']['level']}**: {report['serving']['reason']}",
        f"- ({serving_summary()})",
    ]
    if "adapter" in report:
        lines.append(f"- version `{report['adapter']['version']}`, {report['adapter']['size_bytes'] / 1e6:.2f} MB")
    lines += [
        f"- trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
        f"({report['trainable_percent']:.3f} %)",
        f"- wall time {report['wall_seconds']:.0f} s, peak memory {report['peak_memory_bytes'] / 2**20:.0f} MiB",
        f"- data: {report['data']['train_examples']} train / {report['data']['held_out_examples']} held-out examples, "
        f"sha256 `{report['data']['sha256'][:16]}…`",
        "",
        "## Held-out metrics",
        "",
        # An image classifier's new head has no "base" score; its baseline is a linear probe.
        f"| metric | {(report['base_metrics'] or {}).get('baseline', 'base')} | adapter (mean ± std over seeds) |",
        "|---|---|---|",
    ]
    base = report["base_metrics"] or {}
    for key, stats in report["summary"].items():
        if key == "wall_seconds":
            continue
        base_value = f"{base[key]:.4g}" if key in base else "–"
        lines.append(f"| {key} | {base_value} | {stats['mean']:.4g} ± {stats['std']:.2g} |")
    if "untrained_head_accuracy" in base:
        lines.append(f"\nthe base with the new head untrained: accuracy {base['untrained_head_accuracy']:.4g} "
                     f"(chance {1 / len(report['data']['labels']):.3g}), macro-F1 {base['untrained_head_macro_f1']:.4g}")
    lines.append(f"\nseeds: {', '.join(str(s['seed']) for s in report['seeds'])}; shipped weights: seed {report['best_seed']}")
    if "confusion_matrix" in report["metrics"]:
        labels = report["metrics"]["labels"]
        lines += ["", "## Confusion matrix (rows: gold, columns: predicted)", "", "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for label, row in zip(labels, report["metrics"]["confusion_matrix"]):
            lines.append(f"| **{label}** | " + " | ".join(str(c) for c in row) + " |")
    if report["metrics"].get("samples"):
        lines += ["", "## Sample predictions", "", "| reference | adapter | base |", "|---|---|---|"]
        base_samples = (report["base_metrics"] or {}).get("samples") or [{}] * len(report["metrics"]["samples"])
        for sample, base_sample in zip(report["metrics"]["samples"], base_samples):
            lines.append(f"| {_cell(sample['reference'])} | {_cell(sample['prediction'])} | {_cell(base_sample.get('prediction', '–'))} |")
    lines += _request_markdown(report)
    lines += ["", f"![loss]({LOSS_PLOT})"]
    if report["base_metrics"] is not None:
        lines.append(f"![metrics vs base]({METRICS_PLOT})")
    # Data paths in the config are as given, i.e. relative to where the run was started.
    lines += ["", f"Reproduce (from the directory the run started in): `adaptserve train --config {report['training_config']['output_dir']}/train_config.yaml`", ""]
    return "\n".join(lines)


_SHAPES = {
    "raw": "a raw `prompt`: the row's text as is, no chat template (`/v1/generate` `prompt`, `/v1/completions`)",
    "chat": "chat `messages`, through the base's chat template (`/v1/generate` `messages`, `/v1/chat/completions`)",
}


def _request_markdown(report: dict[str, Any]) -> list[str]:
    request = report["request"]
    prompt_format = PromptFormat.from_dict(request["prompt_format"]) if request["prompt_format"] else None
    lines = ["", "## Asking the served adapter", ""]
    if report["serving"]["level"] == "not-served":
        lines += [f"The server does not serve {report['method']} adapters ({report['serving']['reason']}).", ""]
    if request["field"] == "images":
        lines.append("Request shape: `/v1/classify` with image files (multipart), or base64-encoded `images` in JSON.")
    elif prompt_format is None:
        lines.append("Request shape: `/v1/classify` with the texts as `inputs` (a classifier has one request shape).")
    else:
        lines.append(f"Request shape: **`{request['field']}`**. Trained on `{prompt_format.source_keys}` rows as "
                     f"{_SHAPES[prompt_format.kind]}.")
        if prompt_format.kind == "chat":
            if prompt_format.system_prompt is not None:
                lines.append(f"Every training row began with the system message `{_cell(prompt_format.system_prompt)}`: "
                             "send it too.")
            elif "system" not in prompt_format.roles:
                lines.append("No training row had a system message (the chat template's default applied): send none.")
        other = "prompt" if request["field"] == "messages" else "messages"
        lines.append(f"A request sending `{other}` instead is answered as sent, with a `prompt_format_mismatch` "
                     "entry in the response's `warnings`.")
    decoding = "" if request["field"] == "images" else ", greedy"
    lines += ["", f"One held-out row (reference `{_cell(str(request['reference']).strip())}`){decoding}:", "",
              "```bash", request["curl"], "```"]
    if request["openai_python"]:
        lines += ["", "```python", request["openai_python"], "```"]
    if request["eval_command"]:
        lines += ["", "The held-out figures above, measured through a running server (the base beside):", "",
                  "```bash", request["eval_command"], "```"]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:80]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_loss(outcome: TrainingOutcome, path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for run in outcome.runs:
        train = [(e["step"], e["loss"]) for e in run.log_history if "loss" in e]
        held_out = [(e["step"], e["eval_loss"]) for e in run.log_history if "eval_loss" in e]
        if train:
            axes.plot(*zip(*train), label=f"train (seed {run.seed})")
        if held_out:
            axes.plot(*zip(*held_out), marker="o", label=f"held-out (seed {run.seed})")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{outcome.config.adapter_name}: loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_metrics_vs_base(outcome: TrainingOutcome, path: Path) -> None:
    plt = _pyplot()
    keys = ["exact_match", "token_f1"] if outcome.config.task == "generate" else ["accuracy", "macro_f1"]
    summary = outcome.summary()
    figure, axes = plt.subplots(figsize=(6, 4))
    positions = range(len(keys))
    axes.bar([p - 0.2 for p in positions], [outcome.base_metrics[k] for k in keys], width=0.4, label="base")
    axes.bar(
        [p + 0.2 for p in positions],
        [summary[k]["mean"] for k in keys],
        yerr=[summary[k]["std"] for k in keys],
        width=0.4,
        label=f"adapter ({outcome.config.method})",
    )
    axes.set_xticks(list(positions), keys)
    axes.set_ylim(0, 1.05)
    axes.set_title(f"{outcome.config.adapter_name}: held-out, base vs adapter")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
