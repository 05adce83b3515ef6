"""`train --task image-classify`: LoRA image classifiers on a vision base (mobilenet-v2, or any
local `*ForImageClassification` folder with its image processor config).

Data is an image-folder tree (one subfolder per class, images anywhere inside it) or a CSV /
JSONL of `path,label` (paths relative to that file). Every image goes through
adapters.images.Preprocessing, the function the server applies to a request, so the adapter
is trained on exactly the pixels it will be served.

The model is the base with a new head over the labels (kept in `modules_to_save`, as a plain
PEFT user does) and LoRA on per-architecture default targets (pointwise convolutions of
MobileNetV2, every convolution of ResNet, attention and MLP linears of transformers; grouped
and depthwise convolutions are never targeted: the server refuses LoRA on them).
BatchNorm stays in eval mode throughout: its running statistics belong to the base and are
not saved with the adapter, so updating them would train a model the server never runs.

The honest baseline for a new head is a linear probe on the frozen base: the features of the
whole data set are computed once (one forward pass) and a linear head is fitted on them. The
same pass gives the untrained head's score (chance level). Both go in the report. Training
then starts its new head from that probe (LP-FT, Kumar et al. 2022): the LoRA learns what the
frozen features lack instead of chasing a random head's gradients.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from adapters.bases import ResolvedBase, is_image_classifier, resolve_base
from adapters.images import ImagePolicy, ImageRejected, Preprocessing, decode_image
from trainer.config import TrainConfig
from trainer.data import ClassificationExample, DataError, label_names, split_validation
from trainer.evaluation import classification_metrics
from trainer.methods import _unfreeze_last_layers, trainable_parameters
from trainer.training import (
    PreparedData,
    SeedRun,
    TrainingOutcome,
    _peak_memory_bytes,
    _reset_peak_memory,
    _save_weights,
    _seed_dir,
    _training_arguments,
    is_main_process,
    start_run,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Training data is the user's own: every format PIL reads safely, bounded by PIL's own default.
TRAINING_IMAGES = ImagePolicy(formats=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"), max_pixels=89_478_485)
IMAGE_METHODS = ("lora", "rslora", "last-n-layers")
# Where PEFT users put LoRA on each architecture; regexes match the full module name.
DEFAULT_TARGETS: dict[str, str | list[str]] = {
    "mobilenet_v2": r".*\.(expand_1x1|reduce_1x1|conv_1x1)\.convolution",
    "resnet": ["convolution"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    "convnext": ["pwconv1", "pwconv2"],
}


@dataclass(frozen=True)
class ImageExample(ClassificationExample):
    """`text` is the image file's path, so splitting and label ids are the text classifier's."""

    @property
    def path(self) -> Path:
        return Path(self.text)


def load_image_examples(source: str | Path) -> list[ImageExample]:
    """An image-folder tree, or a CSV / JSONL of path,label; every bad row reported at once."""
    source = Path(source)
    if source.is_dir():
        examples = _load_folder(source)
    elif source.is_file():
        examples = _load_listing(source)
    else:
        raise DataError([(str(source), 0, "no such file or folder")])
    return examples


def _load_folder(root: Path) -> list[ImageExample]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    examples = [ImageExample(str(f), folder.name) for folder in classes
                for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    problems = [(str(folder), 0, "holds no image files") for folder in classes
                if not any(e.label == folder.name for e in examples)]
    if len(classes) < 2:
        problems.append((str(root), 0, f"needs one subfolder per class (at least 2), found {len(classes)}"))
    if problems:
        raise DataError(problems)
    return examples


def _load_listing(path: Path) -> list[ImageExample]:
    problems: list[tuple[str, int, str]] = []
    rows: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            rows = [(reader.line_num, row) for row in reader]
        else:
            for line_number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    problems.append((str(path), line_number, f"not valid JSON ({exc.msg})"))
    examples = []
    for line_number, row in rows:
        image, label = (row.get("path") or row.get("image")) if isinstance(row, dict) else None, \
            row.get("label") if isinstance(row, dict) else None
        if not isinstance(image, str) or not image.strip():
            problems.append((str(path), line_number, "needs a 'path' (or 'image') column naming an image file"))
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            problems.append((str(path), line_number, f"'label' must be a non-empty string or integer, got {label!r}"))
            continue
        file = (path.parent / image).resolve()
        if not file.is_file():
            problems.append((str(path), line_number, f"image {image!r} not found (paths are relative to {path.parent})"))
            continue
        examples.append(ImageExample(str(file), str(label).strip()))
    if not examples and not problems:
        problems.append((str(path), 0, "no examples"))
    if problems:
        raise DataError(problems)
    return examples


def open_image(example: ImageExample, preprocessing: Preprocessing) -> torch.Tensor:
    try:
        image = decode_image(example.path.read_bytes(), TRAINING_IMAGES)
    except ImageRejected as exc:
        raise DataError([(str(example.path), 0, str(exc))]) from None
    return torch.from_numpy(preprocessing(image))  # [3, H, W]


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses on access: a data set of any size costs no memory up front."""

    def __init__(self, examples: Sequence[ImageExample], label_ids: dict[str, int], preprocessing: Preprocessing):
        self.examples, self.label_ids, self.preprocessing = list(examples), label_ids, preprocessing

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"pixel_values": open_image(example, self.preprocessing), "labels": self.label_ids[example.label]}


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),  # [batch, 3, H, W]
            "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}


def load_image_model(base: ResolvedBase, labels: Sequence[str]) -> nn.Module:
    """The base with a fresh head over `labels` (the base's own head, if any, is replaced)."""
    import warnings

    from transformers import AutoModelForImageClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "head reinitialised": exactly what is meant
        return AutoModelForImageClassification.from_pretrained(
            base.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
        )


def head_module_name(model: nn.Module) -> str:
    for name in ("classifier", "head", "fc"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classifier head")


def default_target_modules(model: nn.Module) -> str | list[str]:
    """PEFT targets for this architecture; otherwise a regex of every ungrouped conv and linear of the backbone."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    prefix = model.base_model_prefix
    names = [name for name, m in model.named_modules() if name.startswith(prefix + ".") and (
        isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]
    if not names:
        raise ValueError(f"{type(model).__name__}: no convolution or linear layer a LoRA could target")
    return "|".join(name.replace(".", r"\.") for name in names)


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm in eval mode even when the Trainer calls model.train()."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(lambda m, _: m.train(False) and None)


def apply_image_method(model: nn.Module, config: TrainConfig) -> nn.Module:
    head = head_module_name(model)
    if config.method == "last-n-layers":
        return _unfreeze_last_layers(model, config.last_n_layers, [head])
    if config.method not in ("lora", "rslora"):
        raise ValueError(f"--task image-classify trains {', '.join(IMAGE_METHODS)}; {config.method!r} is not offered")
    from peft import LoraConfig, get_peft_model

    targets = default_target_modules(model) if config.target_modules == "all-linear" else config.target_modules
    if isinstance(targets, list) and len(targets) == 1 and any(c in targets[0] for c in "*()|[\\"):
        targets = targets[0]  # one regex (PEFT full-matches a string, suffix-matches list items)
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=targets, use_rslora=config.method == "rslora", modules_to_save=[head])
    return get_peft_model(model, peft_config)


# --- baselines from one pass over the frozen base --------------------------------------------

@torch.no_grad()
def base_features(model: nn.Module, dataset: ImageDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, hidden] the head reads, labels [n]) with the head replaced by an identity."""
    from tqdm.auto import tqdm

    head, linear = getattr(model, head_module_name(model)), head_linear(model)
    parent, child = next((parent, child) for parent in [model, *head.modules()]
                         for child, m in parent.named_children() if m is linear)
    setattr(parent, child, nn.Identity())
    model.eval()
    features, labels = [], []
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        for batch in tqdm(loader, desc="base features (linear probe)", unit="batch"):
            features.append(model(pixel_values=batch["pixel_values"]).logits.float())
            labels.append(batch["labels"])
    finally:
        setattr(parent, child, linear)
    return torch.cat(features), torch.cat(labels)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, seed: int) -> nn.Linear:
    """A softmax regression on frozen features (L-BFGS, a little weight decay)."""
    torch.manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], classes)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mean) / std
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x), train_y) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer: probe(x) on raw features
        probe.weight /= std
        probe.bias -= (probe.weight * mean).sum(1)
    return probe


@torch.no_grad()
def evaluate_images(model: nn.Module, dataset: ImageDataset, labels: Sequence[str], batch_size: int) -> dict[str, Any]:
    model.eval()
    gold, predicted = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        logits = model(pixel_values=batch["pixel_values"]).logits  # [batch, labels]
        predicted.extend(logits.argmax(-1).tolist())
        gold.extend(batch["labels"].tolist())
    return classification_metrics(gold, predicted, labels)


# --- a run ------------------------------------------------------------------------------------

def prepare_image_data(config: TrainConfig) -> PreparedData:
    examples = load_image_examples(config.train_file)
    if config.validation_file:
        train, held_out = examples, load_image_examples(config.validation_file)
    else:
        train, held_out = split_validation(examples, config.validation_fraction, seed=0)
    return PreparedData(train, held_out, label_names(train, held_out), images_sha256(train + held_out))


def images_sha256(examples: Sequence[ImageExample]) -> str:
    """One digest over every image's label, file name and bytes, in a stable order."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: (e.label, e.path.name, e.text)):
        digest.update(f"{example.label}\0{example.path.name}\0".encode())
        digest.update(example.path.read_bytes())
    return digest.hexdigest()


# The linear probe and its held-out metrics; read only once fitted.
Baselines = tuple[nn.Linear, dict[str, Any]]


def run_image_training(config: TrainConfig, shared: list[Baselines] | None = None) -> TrainingOutcome:
    """`shared`: one compare run's probe, fitted by its first method and reused by the others
    (same base, data, split and seeds; the probe is a forward of every image through the base
    and a regression, about 5 of the digits example's 11 minutes per method). Empty: fit and
    append; None: fit for this run alone."""
    output_dir = start_run(config)
    base = resolve_base(config.base)
    preprocessing = _vision_preprocessing(base)
    data = prepare_image_data(config)
    label_ids = {name: i for i, name in enumerate(data.labels)}
    train_set = ImageDataset(data.train, label_ids, preprocessing)
    held_out_set = ImageDataset(data.held_out, label_ids, preprocessing)
    logger.info("%d training / %d held-out images, %d labels", len(train_set), len(held_out_set), len(data.labels))

    runs, probe, probe_metrics = [], None, None
    for seed in config.seeds:
        set_seed(seed)
        _reset_peak_memory()
        started = time.perf_counter()
        model = load_image_model(base, data.labels)
        if probe is None:  # one probe for every seed: it is fitted to convergence, not sampled
            if shared:
                probe, found = shared[0]
            else:
                probe, found = _baselines(model, train_set, held_out_set, data.labels, config, seed)
                if shared is not None:
                    shared.append((probe, found))
            probe_metrics = dict(found)
        head_linear(model).load_state_dict(probe.state_dict())
        model = apply_image_method(model, config)
        freeze_batchnorm(model)
        trainable, total = trainable_parameters(model)
        checkpoint_dir = output_dir / "checkpoints" / f"seed-{seed}"
        # Held-out loss during training only when early stopping needs it: each pass is a full forward.
        has_eval = bool(config.early_stopping_patience)
        trainer = Trainer(model=model, args=_training_arguments(config, seed, checkpoint_dir, has_eval),
                          train_dataset=train_set, eval_dataset=held_out_set if has_eval else None,
                          data_collator=collate, callbacks=_early_stopping(config))
        resume_from = get_last_checkpoint(str(checkpoint_dir)) if config.resume and checkpoint_dir.is_dir() else None
        trainer.train(resume_from_checkpoint=resume_from)
        metrics: dict[str, Any] = {}
        run_dir = _seed_dir(config, seed)
        if trainer.is_world_process_zero():
            metrics = evaluate_images(trainer.model, held_out_set, data.labels, config.eval_batch_size)
            run_dir.mkdir(parents=True, exist_ok=True)
            _save_weights(trainer.model, config, run_dir, base.canonical_id)
        runs.append(SeedRun(seed, metrics, list(trainer.state.log_history), time.perf_counter() - started,
                            _peak_memory_bytes(), trainable, total, run_dir))
    outcome = TrainingOutcome(config, base, data, runs, probe_metrics if config.evaluate_base else None)
    if len(runs) > 1 and is_main_process():
        from trainer.training import _copy_weights

        _copy_weights(outcome.best.weights_dir, output_dir)
    return outcome


def _vision_preprocessing(base: ResolvedBase) -> Preprocessing:
    from transformers import AutoConfig

    if not is_image_classifier(AutoConfig.from_pretrained(base.path)):
        raise ValueError(f"--task image-classify needs an image classification base (e.g. mobilenet-v2); "
                         f"{base.canonical_id} is not one")
    return Preprocessing.from_folder(base.path)


def _early_stopping(config: TrainConfig) -> list:
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(config.early_stopping_patience)] if config.early_stopping_patience else []


def head_linear(model: nn.Module) -> nn.Linear:
    """The linear layer of the head (ResNet's head is Sequential(Flatten, Linear))."""
    head = getattr(model, head_module_name(model))
    return head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))


def _baselines(model: nn.Module, train_set: ImageDataset, held_out_set: ImageDataset, labels: Sequence[str],
               config: TrainConfig, seed: int) -> tuple[nn.Linear, dict[str, Any]]:
    """The linear probe on the frozen base, its held-out metrics (the report's "base"), and the
    untrained head's score there."""
    started = time.perf_counter()
    untrained = head_linear(model)
    train_x, train_y = base_features(model, train_set, config.eval_batch_size)
    held_x, held_y = base_features(model, held_out_set, config.eval_batch_size)
    probe = linear_probe(train_x, train_y, len(labels), seed)
    with torch.no_grad():
        probe_metrics = classification_metrics(held_y.tolist(), probe(held_x).argmax(-1).tolist(), labels)
        chance = classification_metrics(held_y.tolist(), untrained(held_x).argmax(-1).tolist(), labels)
    probe_metrics["baseline"] = "linear probe on the frozen base"
    probe_metrics["untrained_head_accuracy"] = chance["accuracy"]
    probe_metrics["untrained_head_macro_f1"] = chance["macro_f1"]
    probe_metrics["probe_seconds"] = time.perf_counter() - started
    probe_metrics["feature_size"] = train_x.shape[1]
    return probe, probe_metrics


def image_request_section(outcome: TrainingOutcome) -> dict[str, Any]:
    """The report's "asking the served adapter" part for an image classifier: one held-out image."""
    import shlex

    from trainer.serving_request import DEFAULT_SERVER

    name, example = outcome.config.adapter_name, outcome.data.held_out[0]
    curl = (f"curl -s {DEFAULT_SERVER}/v1/classify -F adapter={name} "
            f"-F image=@{shlex.quote(str(example.path))}")
    return {
        "field": "images", "prompt_format": None,
        "native": {"path": "/v1/classify", "body": {"adapter": name, "images": ["<the file, base64-encoded>"]}},
        "openai": None, "curl": curl, "openai_python": None, "reference": example.label,
        "held_out_file": outcome.config.validation_file, "eval_command": None,
    }
