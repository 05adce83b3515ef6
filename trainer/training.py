"""One `train` run: data -> base -> method -> transformers.Trainer -> held-out metrics -> adapter folder.

Runs unchanged under `torchrun` / `accelerate launch`: transformers.Trainer handles the
process group; only the main process evaluates and writes the output folder.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from adapters.bases import ResolvedBase, resolve_base
from adapters.manifest import PromptFormat
from trainer.config import TrainConfig
from trainer.data import Example, files_sha256, label_names, load_examples, split_validation
from trainer.evaluation import HEADLINE_METRIC, evaluate_classification, evaluate_generation
from trainer.features import PaddingCollator, encode_classification, encode_generation
from trainer.methods import SERVING_SUPPORT, apply_method, trainable_parameters
from trainer.models import load_base_model, load_tokenizer
from trainer.prompt_format import resolve_prompt_format

logger = logging.getLogger(__name__)

PARTIAL_WEIGHTS_FILE = "trained_parameters.safetensors"  # last-n-layers output: not an adapter


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    held_out: list[Example]
    labels: list[str] | None  # classify only, in id order
    sha256: str
    prompt_format: PromptFormat | None = None  # generate only: how prompts are rendered (and served)


@dataclass
class SeedRun:
    seed: int
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    wall_seconds: float
    peak_memory_bytes: int
    trainable_parameters: int
    total_parameters: int
    weights_dir: Path  # where this seed's adapter (or partial weights) was saved


@dataclass
class TrainingOutcome:
    config: TrainConfig
    base: ResolvedBase
    data: PreparedData
    runs: list[SeedRun]
    base_metrics: dict[str, Any] | None
    best: SeedRun = field(init=False)

    def __post_init__(self) -> None:
        key = HEADLINE_METRIC[self.config.task]
        # Non-main ranks of a distributed run measure nothing; any run is then "best".
        self.best = max(self.runs, key=lambda run: run.metrics.get(key, 0.0))

    def summary(self) -> dict[str, dict[str, float]]:
        """mean and std over seeds of every scalar metric."""
        scalar_keys = [k for k, v in self.runs[0].metrics.items() if isinstance(v, (int, float)) and k != "examples"]
        summary = {}
        for key in scalar_keys + ["wall_seconds"]:
            values = [run.wall_seconds if key == "wall_seconds" else run.metrics[key] for run in self.runs]
            summary[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        return summary


def is_main_process() -> bool:
    """True outside torchrun/accelerate, and on rank 0 inside: the one process that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_data(config: TrainConfig, has_chat_template: bool) -> PreparedData:
    examples = load_examples(config.train_file, config.task)
    if config.validation_file:
        train, held_out = examples, load_examples(config.validation_file, config.task)
    else:
        # The split seed is fixed (not per training seed) so --seeds compares runs on the same split.
        train, held_out = split_validation(examples, config.validation_fraction, seed=0)
    labels = label_names(train, held_out) if config.task == "classify" else None
    prompt_format = None
    if config.task == "generate":
        prompt_format, train, held_out = resolve_prompt_format(train, held_out, config.prompt_format, has_chat_template)
    sha256 = files_sha256([config.train_file, config.validation_file])
    return PreparedData(train, held_out, labels, sha256, prompt_format)


def evaluate(model, tokenizer, config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    if config.task == "classify":
        return evaluate_classification(
            model, tokenizer, data.held_out, data.labels, batch_size=config.eval_batch_size, max_length=config.max_length
        )
    return evaluate_generation(
        model,
        tokenizer,
        data.held_out,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
    )


def start_run(config: TrainConfig) -> Path:
    """What every training run does first: threads, the output folder, and the resolved
    config written into it (by rank 0). Returns the folder."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        config.write(output_dir)
    return output_dir


def run_training(config: TrainConfig) -> TrainingOutcome:
    output_dir = start_run(config)
    base = resolve_base(config.base)
    data = prepare_data(config, has_chat_template=bool(load_tokenizer(base).chat_template))
    logger.info("%d training / %d held-out examples; %s", len(data.train), len(data.held_out), SERVING_SUPPORT[config.method].reason)

    runs: list[SeedRun] = []
    base_metrics = None
    for index, seed in enumerate(config.seeds):
        run, measured_base = _train_one_seed(config, base, data, seed, evaluate_base=config.evaluate_base and index == 0)
        base_metrics = base_metrics or measured_base
        runs.append(run)
    outcome = TrainingOutcome(config, base, data, runs, base_metrics)
    if len(runs) > 1 and is_main_process():
        # The shipped adapter is the best seed's; every seed's metrics stay in the report.
        _copy_weights(outcome.best.weights_dir, output_dir)
    return outcome


def _seed_dir(config: TrainConfig, seed: int) -> Path:
    output_dir = Path(config.output_dir)
    return output_dir if len(config.seeds) == 1 else output_dir / "seeds" / f"seed-{seed}"


def _train_one_seed(
    config: TrainConfig, base: ResolvedBase, data: PreparedData, seed: int, evaluate_base: bool
) -> tuple[SeedRun, dict[str, Any] | None]:
    set_seed(seed)
    _reset_peak_memory()
    started = time.perf_counter()
    tokenizer = load_tokenizer(base)
    model = load_base_model(base, config.task, tokenizer, data.labels, config.quantize)
    # Measured before the method touches the model: prompt tuning and IA3 change outputs
    # at initialisation, and a classifier's untrained head is exactly the base's.
    base_metrics = evaluate(model, tokenizer, config, data) if evaluate_base and is_main_process() else None
    model = apply_method(model, config)
    trainable, total = trainable_parameters(model)

    train_rows, held_out_rows = _encode(config, tokenizer, data)
    run_dir = _seed_dir(config, seed)
    checkpoint_dir = Path(config.output_dir) / "checkpoints" / f"seed-{seed}"
    trainer = Trainer(
        model=model,
        args=_training_arguments(config, seed, checkpoint_dir, len(held_out_rows) > 0),
        train_dataset=train_rows,
        eval_dataset=held_out_rows,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=[EarlyStoppingCallback(config.early_stopping_patience)] if config.early_stopping_patience else [],
    )
    resume_from = get_last_checkpoint(str(checkpoint_dir)) if config.resume and checkpoint_dir.is_dir() else None
    if config.resume and resume_from is None:
        logger.warning("--resume: no checkpoint under %s; starting from scratch", checkpoint_dir)
    trainer.train(resume_from_checkpoint=resume_from)

    metrics: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        metrics = evaluate(trainer.model, tokenizer, config, data)
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_weights(trainer.model, config, run_dir, base.canonical_id)
    run = SeedRun(
        seed=seed,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
        wall_seconds=time.perf_counter() - started,
        peak_memory_bytes=_peak_memory_bytes(),
        trainable_parameters=trainable,
        total_parameters=total,
        weights_dir=run_dir,
    )
    return run, base_metrics


def _encode(config: TrainConfig, tokenizer, data: PreparedData) -> tuple[list[dict], list[dict]]:
    if config.task == "classify":
        label_ids = {name: i for i, name in enumerate(data.labels)}
        encode = lambda e: encode_classification(e, tokenizer, label_ids, config.max_length)  # noqa: E731
    else:
        encode = lambda e: encode_generation(e, tokenizer, config.max_length)  # noqa: E731
    return [encode(e) for e in data.train], [encode(e) for e in data.held_out]


def _training_arguments(config: TrainConfig, seed: int, checkpoint_dir: Path, has_eval: bool) -> TrainingArguments:
    every = "steps" if has_eval else "no"
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        eval_strategy=every,
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,  # equal to eval_steps so the best checkpoint can be restored
        save_total_limit=2,
        load_best_model_at_end=bool(config.early_stopping_patience) and has_eval,
        metric_for_best_model="eval_loss",
        logging_steps=max(1, min(10, config.eval_steps)),
        logging_first_step=True,
        seed=seed,
        report_to="none",
        remove_unused_columns=False,  # rows are pre-tokenized dicts, not a datasets.Dataset
        use_cpu=not torch.cuda.is_available(),
        # Mixed precision where the GPU has it (bf16 on Ampere and newer, else fp16); CPU stays fp32.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        fp16=torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
    )


def _save_weights(model, config: TrainConfig, directory: Path, base_id: str) -> None:
    if config.method == "last-n-layers":
        trained = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(directory / PARTIAL_WEIGHTS_FILE))
        return
    # Record the canonical hub id, not this machine's cache path, as the adapter's base.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_id
    # save_embedding_layers=False: no method here trains embeddings, and PEFT's "auto" check
    # would look the base id up on the hub.
    model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    # PEFT writes a README.md model card template; the report is the real card.
    (directory / "README.md").unlink(missing_ok=True)


def _copy_weights(source: Path, destination: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", PARTIAL_WEIGHTS_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # Linux: writing 5 resets VmHWM, so each seed/method in one process gets its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # peak resident set since the last reset, in kB
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # No /proc (macOS): the process's lifetime peak, which ru_maxrss reports in bytes there.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
