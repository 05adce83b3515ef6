"""`compare`: the same task trained with several methods, side by side (the seed's comparison)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

from trainer.config import TrainConfig
from trainer.evaluation import HEADLINE_METRIC
from trainer.methods import SERVING_SUPPORT
from trainer.report import write_outputs
from trainer.training import run_training

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PLOT = "compare.png"
DEFAULT_METHODS = ("last-n-layers", "lora", "dora", "ia3", "prompt-tuning")
# The seed's image comparison: last-N-layers vs LoRA, with the linear probe (the baseline every
# image run measures) as a row of its own.
DEFAULT_IMAGE_METHODS = ("last-n-layers", "lora")


def compare_methods(config: TrainConfig, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Trains `config` once per method into OUTPUT/<method>/ and writes the comparison beside them."""
    root = Path(config.output_dir)
    train = run_training
    if config.task == "image-classify":
        from trainer.vision import run_image_training

        train = functools.partial(run_image_training, shared=[])  # the first method's probe serves them all
    rows = []
    for index, method in enumerate(methods):
        method_config = dataclasses.replace(
            config,
            method=method,
            output_dir=str(root / method),
            name=f"{config.adapter_name}-{method}",
            evaluate_base=index == 0,  # the base is the same for every method: measure it once
        )
        report = write_outputs(train(method_config))
        rows.append(_row(method, report))
    base_metrics = json.loads((root / methods[0] / "report.json").read_text())["base_metrics"]
    if config.task == "image-classify" and base_metrics:
        rows.append(_probe_row(base_metrics, json.loads((root / methods[0] / "report.json").read_text())))
    headline = HEADLINE_METRIC[config.task]
    (root / COMPARE_JSON).write_text(json.dumps({"headline_metric": headline, "base_metrics": base_metrics, "methods": rows}, indent=2))
    (root / COMPARE_MD).write_text(render_table(rows, headline, base_metrics))
    plot_comparison(rows, headline, base_metrics, root / COMPARE_PLOT)
    return rows


def _row(method: str, report: dict[str, Any]) -> dict[str, Any]:
    headline = report["headline_metric"]
    directory = Path(report["training_config"]["output_dir"])
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {
        "method": method,
        "serving": SERVING_SUPPORT[method].level,
        "trainable_percent": report["trainable_percent"],
        "metric_mean": report["summary"][headline]["mean"],
        "metric_std": report["summary"][headline]["std"],
        "seconds_per_seed": report["summary"]["wall_seconds"]["mean"],
        "peak_memory_bytes": report["peak_memory_bytes"],
        "size_bytes": weights,
    }


def _probe_row(probe: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The linear probe on the frozen base: only a new head is trained."""
    labels, hidden = len(report["data"]["labels"]), probe["feature_size"]
    head = labels * hidden + labels
    return {
        "method": "linear-probe", "serving": "baseline", "trainable_percent": 100.0 * head / report["total_parameters"],
        "metric_mean": probe[report["headline_metric"]], "metric_std": 0.0, "seconds_per_seed": probe["probe_seconds"],
        "peak_memory_bytes": report["peak_memory_bytes"], "size_bytes": 4 * head,
    }


def render_table(rows: list[dict[str, Any]], headline: str, base_metrics: dict[str, Any] | None) -> str:
    base_text = f"{base_metrics[headline]:.3f}" if base_metrics else "not measured"
    lines = [
        f"# Method comparison ({headline}; base model: {base_text})",
        "",
        f"| method | served by adaptserve | trainable % | {headline} (mean ± std) | s per seed | peak MiB | weights MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['serving']} | {r['trainable_percent']:.3f} | {r['metric_mean']:.3f} ± {r['metric_std']:.3f} "
            f"| {r['seconds_per_seed']:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} | {r['size_bytes'] / 1e6:.2f} |"
        )
    lines += ["", f"![comparison]({COMPARE_PLOT})", ""]
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], headline: str, base_metrics: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (metric_axes, cost_axes) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["method"] for r in rows]
    metric_axes.bar(names, [r["metric_mean"] for r in rows], yerr=[r["metric_std"] for r in rows])
    if base_metrics:
        metric_axes.axhline(base_metrics[headline], color="grey", linestyle="--", label="base")
        metric_axes.legend()
    metric_axes.set_ylabel(f"held-out {headline}")
    metric_axes.set_ylim(0, 1.05)
    cost_axes.bar(names, [r["trainable_percent"] for r in rows])
    cost_axes.set_ylabel("trainable parameters (%)")
    cost_axes.set_yscale("log")
    for axes in (metric_axes, cost_axes):
        axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
