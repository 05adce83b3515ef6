"""The output folder's documents: manifest.json, report.json, report.md, loss and metric plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.package import content_sha256
from trainer.evaluation import HEADLINE_METRIC
from trainer.methods import SERVING_SUPPORT, serving_summary
from trainer.training import TrainingOutcome

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_PLOT = "loss.png"
METRICS_PLOT = "metrics.png"


def write_outputs(outcome: TrainingOutcome) -> dict[str, Any]:
    """Writes manifest (for real adapters), report.json, report.md and plots; returns the report."""
    directory = Path(outcome.config.output_dir)
    report = build_report(outcome)
    if (directory / CONFIG_FILE).is_file():
        manifest = build_manifest(outcome, directory, report)
        manifest.write(directory)
        report["adapter"] = {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256, "size_bytes": manifest.size_bytes}
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
        "loss_history": [
            {k: entry[k] for k in ("step", "loss", "eval_loss") if k in entry} for entry in best.log_history
        ],
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
        task=outcome.config.task,
        peft_type=adapter_config["peft_type"],
        rank=int(rank),
        target_modules=tuple(sorted([targets] if isinstance(targets, str) else targets)),
        size_bytes=(directory / CONFIG_FILE).stat().st_size + (directory / WEIGHTS_FILE).stat().st_size,
        base_model=outcome.base.canonical_id,
        labels=tuple(outcome.data.labels) if outcome.data.labels else None,
        created_at=time.time(),
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
        "| metric | base | adapter (mean ± std over seeds) |",
        "|---|---|---|",
    ]
    base = report["base_metrics"] or {}
    for key, stats in report["summary"].items():
        if key == "wall_seconds":
            continue
        base_value = f"{base[key]:.4g}" if key in base else "–"
        lines.append(f"| {key} | {base_value} | {stats['mean']:.4g} ± {stats['std']:.2g} |")
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
    lines += ["", f"![loss]({LOSS_PLOT})"]
    if report["base_metrics"] is not None:
        lines.append(f"![metrics vs base]({METRICS_PLOT})")
    # Data paths in the config are as given, i.e. relative to where the run was started.
    lines += ["", f"Reproduce (from the directory the run started in): `adaptserve train --config {report['training_config']['output_dir']}/train_config.yaml`", ""]
    return "\n".join(lines)


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
