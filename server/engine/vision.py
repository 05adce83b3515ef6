"""VisionEngine: one resident image classifier, many LoRA classifiers in one batched forward.

The base is any transformers `*ForImageClassification` (MobileNetV2, ResNet, ViT, ConvNeXt...).
Its head linear is replaced by an identity, so the model's own forward (pooling, flatten,
layer norm, dropout in eval) yields the features a head reads: `logits` = [rows, hidden].
Each row then goes through its own adapter's head in float32; heads may differ in label
count. Rows without an adapter use the base's own head (ImageNet labels for mobilenet-v2).

Every Conv2d and Linear of the backbone is wrapped once in a `SlotLoRAVision` that owns a
pool of adapter weights, one slot per resident adapter (slot 0 = the base, all zeros):

    A: [slots, r_cap, in * kh * kw]   scale * B: [slots, out, r_cap]

the flattened form every `LoraModule` holds (adapters.validate). Before a forward the
engine sets one `RowPlan` (each row's slot); each layer adds, for the rows on an adapter
only, their own adapter's delta in one batched call whatever the mix:

    Linear: h = bmm(x_rows [n, tokens, in], A_rows^T [n, in, r]); delta = bmm(h, (sB)_rows^T)
    Conv2d: h = conv2d(x_rows as [1, n * in, H, W], A_rows as [n * r, in, kh, kw], groups=n)
            (each row convolved with its own A: PEFT's lora_A conv, same kernel, stride and
            padding as the base conv); delta = bmm((sB)_rows [n, out, r], h [n, r, H' W'])

which is PEFT's `lora_B(lora_A(x)) * scaling` per row. Smaller ranks are zero-padded to the
largest rank in the batch (exact zeros). BatchNorm and dropout stay in eval: the base's
running statistics are part of the base, never of an adapter.

Generation is not served: `add` raises, and the API answers a vision base's generate with a 400.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

from adapters.bases import distinct_labels, is_image_classifier, resolve_base
from adapters.images import Preprocessing
from adapters.package import AdapterPackage, LoraModule
from adapters.signature import BaseSignature, ConvShape
from server.contract import (
    AdapterBinding,
    ClassifyItem,
    ClassifyResult,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)
from server.engine.base import BaseModelError, pick_device, pick_dtype
from server.engine.slots import AdapterSlots, SlotTableEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowPlan:
    """Which adapter slot each row of this forward runs on (0: the base, no delta)."""

    rows: torch.Tensor  # [n] long: the batch rows that have an adapter
    slots: torch.Tensor  # [n] long: their slots
    distinct: tuple[int, ...]  # the slots in use, so a layer finds its largest rank without a device sync

    @classmethod
    def build(cls, slots: Sequence[int], device: torch.device) -> "RowPlan | None":
        adapted = [(row, slot) for row, slot in enumerate(slots) if slot]
        if not adapted:
            return None
        rows, row_slots = zip(*adapted)
        return cls(torch.tensor(rows, dtype=torch.long, device=device),
                   torch.tensor(row_slots, dtype=torch.long, device=device), tuple(sorted(set(row_slots))))


class PlanHolder:
    """The plan of the current forward, shared by every wrapped layer (None: all on the base)."""

    def __init__(self) -> None:
        self.plan: RowPlan | None = None


class SlotLoRAVision(nn.Module):
    """A Conv2d or Linear of the base plus a slot pool of LoRA deltas (see the module docstring)."""

    def __init__(self, base_layer: nn.Conv2d | nn.Linear, slots: int, holder: PlanHolder):
        super().__init__()
        self.base_layer = base_layer
        self.holder = holder
        self.slots = slots + 1  # + the zero slot
        self.conv = isinstance(base_layer, nn.Conv2d)
        if self.conv:
            self.in_flat = base_layer.in_channels * base_layer.kernel_size[0] * base_layer.kernel_size[1]
            self.out_features = base_layer.out_channels
        else:
            self.in_flat, self.out_features = base_layer.in_features, base_layer.out_features
        self.r_cap = 0
        # Allocated on first use: a module no loaded adapter targets costs nothing.
        self.lora_a: torch.Tensor | None = None  # [slots, r_cap, in_flat]
        self.lora_b: torch.Tensor | None = None  # [slots, out, r_cap]: scale * B
        self.ranks = [0] * self.slots

    # Model code reads these (ViT casts pixels to `patch_embeddings.projection.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.inference_mode()
    def load_slot(self, slot: int, weights: LoraModule, dtype: torch.dtype, device: torch.device) -> None:
        if self.lora_a is None or weights.rank > self.r_cap:
            self._grow(weights.rank, dtype, device)
        self.clear_slot(slot)
        self.lora_a[slot, : weights.rank] = weights.a.to(device=device, dtype=dtype)
        self.lora_b[slot, :, : weights.rank] = (weights.b.to(device=device, dtype=torch.float32) * weights.scale).to(dtype)
        self.ranks[slot] = weights.rank

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None and self.ranks[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.ranks[slot] = 0

    def _grow(self, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """Reallocate with room for `rank`, keeping loaded slots (rare: a larger rank arrives)."""
        new_cap = max(rank, 8, self.r_cap * 2 if self.r_cap else 0)
        new_a = torch.zeros(self.slots, new_cap, self.in_flat, dtype=dtype, device=device)
        new_b = torch.zeros(self.slots, self.out_features, new_cap, dtype=dtype, device=device)
        if self.lora_a is not None:
            new_a[:, : self.r_cap] = self.lora_a
            new_b[:, :, : self.r_cap] = self.lora_b
        self.lora_a, self.lora_b, self.r_cap = new_a, new_b, new_cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.holder.plan
        if plan is None or self.lora_a is None:
            return out
        rank = max(self.ranks[slot] for slot in plan.distinct)
        if not rank:
            return out  # no adapter of this batch targets this layer
        a = self.lora_a.index_select(0, plan.slots)[:, :rank]  # [n, r, in_flat]
        b = self.lora_b.index_select(0, plan.slots)[:, :, :rank]  # [n, out, r]
        rows = x.index_select(0, plan.rows).to(a.dtype)
        delta = self._conv_delta(rows, a, b) if self.conv else self._linear_delta(rows, a, b)
        return out.index_add(0, plan.rows, delta.to(out.dtype))

    def _linear_delta(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        tokens = rows.reshape(rows.shape[0], -1, self.in_flat)  # [n, tokens, in]
        hidden = torch.bmm(tokens, a.transpose(1, 2))  # [n, tokens, r]
        delta = torch.bmm(hidden, b.transpose(1, 2))  # [n, tokens, out]
        return delta.view(*rows.shape[:-1], self.out_features)

    def _conv_delta(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = rows.shape
        layer: nn.Conv2d = self.base_layer
        rank = a.shape[1]
        kernels = a.reshape(n * rank, channels, *layer.kernel_size)  # row i's A: kernels i*r..(i+1)*r
        # groups=n: row i's channels meet only row i's kernels. PEFT's lora_A takes the base's
        # kernel, stride and padding (not its dilation), so this does too.
        hidden = F.conv2d(rows.reshape(1, n * channels, height, width), kernels,
                          stride=layer.stride, padding=layer.padding, groups=n)  # [1, n*r, H', W']
        out_height, out_width = hidden.shape[-2:]
        delta = torch.bmm(b, hidden.view(n, rank, out_height * out_width))  # [n, out, H'*W']
        return delta.view(n, self.out_features, out_height, out_width)


@dataclass
class LoadedVisionBase:
    model: nn.Module  # *ForImageClassification with its head linear replaced by an identity
    backbone: nn.Module
    signature: BaseSignature
    preprocessing: Preprocessing
    base_head: tuple[torch.Tensor, torch.Tensor | None] | None  # the base's trained head, if it has one
    base_labels: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype


def _head_linear(model: nn.Module) -> tuple[str, str, nn.Linear]:
    """(head module, path of its linear inside it, the linear) of an image classifier."""
    for name in ("classifier", "head", "fc"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return name, "", head
        if isinstance(head, nn.Module):
            linears = [(child, m) for child, m in head.named_modules() if isinstance(m, nn.Linear)]
            if len(linears) == 1:
                return name, linears[0][0], linears[0][1]
    raise BaseModelError(f"{type(model).__name__} has no single-linear classifier head; it cannot be served")


def load_vision_base(base_model: str, cache_dir: Path, device: str = "auto", dtype: str = "auto",
                     quantize: str = "auto") -> LoadedVisionBase:
    if quantize not in ("auto", "none"):
        raise BaseModelError(f"--quantize {quantize}: vision bases are served unquantized")
    resolved = resolve_base(base_model, cache_dir / "bases")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    config = AutoConfig.from_pretrained(resolved.path)
    if not is_image_classifier(config):
        raise BaseModelError(f"{resolved.canonical_id} is not an image classifier")
    try:
        preprocessing = Preprocessing.from_folder(resolved.path)
    except (FileNotFoundError, ValueError) as exc:
        raise BaseModelError(f"{resolved.canonical_id}: {exc}") from exc
    model, loading = AutoModelForImageClassification.from_pretrained(
        resolved.path, dtype=torch_dtype, output_loading_info=True
    )
    model.to(torch_device).eval()
    model.requires_grad_(False)
    head_module, head_linear, linear = _head_linear(model)
    head_prefix = ".".join(filter(None, [head_module, head_linear]))
    # A checkpoint without head weights (a bare backbone) got a random head: not a base head.
    trained_head = not any(key.startswith(head_prefix + ".") for key in loading.get("missing_keys", []))
    base_head = (linear.weight.detach().float().clone(),
                 linear.bias.detach().float().clone() if linear.bias is not None else None) if trained_head else None
    labels = tuple(distinct_labels([str(config.id2label[i]) for i in range(linear.out_features)])) if trained_head else ()
    # The model's own forward now ends at the features the head reads ([rows, hidden]).
    parent = model.get_submodule(head_module) if head_linear else model
    setattr(parent, head_linear or head_module, nn.Identity())

    backbone = model.get_submodule(model.base_model_prefix)
    linear_shapes: dict[str, tuple[int, int]] = {}
    conv_shapes: dict[str, ConvShape] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear):
            linear_shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            conv_shapes[name] = ConvShape(module.in_channels, module.out_channels, tuple(module.kernel_size),
                                          tuple(module.stride), tuple(module.padding), module.groups)
    signature = BaseSignature(
        canonical_id=resolved.canonical_id, kind="vision", backbone_prefix=model.base_model_prefix,
        hidden_size=linear.in_features, linear_shapes=linear_shapes, head_module=head_module,
        head_has_bias=linear.bias is not None, conv_shapes=conv_shapes, head_linear=head_linear,
    )
    logger.info("vision base %s loaded: %s, %s, %d convolutions and %d linears adaptable, %s head",
                resolved.canonical_id, torch_device, torch_dtype, len(conv_shapes), len(linear_shapes),
                f"{len(labels)}-label" if trained_head else "no trained")
    return LoadedVisionBase(model, backbone, signature, preprocessing, base_head, labels, torch_device, torch_dtype)


def inject_vision_lora(backbone: nn.Module, slots: int, holder: PlanHolder) -> dict[str, SlotLoRAVision]:
    """Wrap every Conv2d and Linear of `backbone` in place; returns canonical name -> wrapper."""
    wrapped: dict[str, SlotLoRAVision] = {}
    targets = [(n, m) for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        wrapper = SlotLoRAVision(module, slots, holder)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


class VisionEngine(SlotTableEngine):
    """The Engine contract over an image classifier: classify only (see the module docstring)."""

    def __init__(self, base: LoadedVisionBase, max_batch_size: int, max_device_adapters: int,
                 device_budget_bytes: int | None = None):
        self.base = base
        self.signature = base.signature
        self.preprocessing = base.preprocessing
        self.device = base.device
        self.max_batch_size = max_batch_size
        self.holder = PlanHolder()
        self.layers = inject_vision_lora(base.backbone, max_device_adapters, self.holder)
        self.slots = AdapterSlots(max_device_adapters, self.device, device_budget_bytes, self._copy_in,
                                  self._clear_slot)
        self.info = EngineInfo(
            base_id=base.signature.canonical_id, kind="vision", max_context=0, device=str(base.device),
            dtype=str(base.dtype).removeprefix("torch."), quantization="none",
            max_device_adapters=max_device_adapters, has_chat_template=False, base_labels=base.base_labels,
            image_preprocessing=base.preprocessing,
        )

    # --- text and generation: not on an image base ---------------------------------------

    def tokenize(self, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]:
        raise ValueError(f"{self.info.base_id} is an image classifier: it has no tokenizer")

    def count_tokens(self, text: str) -> int:
        raise ValueError(f"{self.info.base_id} is an image classifier: it has no tokenizer")

    def add(self, request: GenerationRequest) -> None:
        raise ValueError(f"{self.info.base_id} is an image classifier: it does not generate")

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        return None  # nothing is ever queued

    def has_work(self) -> bool:
        return False

    def step(self) -> list[TokenEvent]:
        return []

    def abort_all(self, error: str) -> list[TokenEvent]:
        return []

    # --- adapters -------------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterBinding) -> int:
        return self.slot_without_waiting(adapter)  # a vision engine only classifies

    def _copy_in(self, slot: int, package: AdapterPackage) -> None:
        for name, weights in package.modules.items():
            self.layers[name].load_slot(slot, weights, self.base.dtype, self.device)

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": 0, "kv_tokens": 0, "kv_capacity_tokens": 0, "running_adapters": [],
                "waiting_adapters": [], "resident_adapter_keys": list(self.slots.by_key)}

    # --- classification -------------------------------------------------------------------

    @torch.inference_mode()
    def classify(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        """Rows of one image size share a forward (a config without a crop keeps sizes apart)."""
        results: list[ClassifyResult | None] = [None] * len(items)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            if item.pixels is None:
                raise ValueError("a vision base classifies images: the item has no pixels")
            by_shape.setdefault(tuple(item.pixels.shape), []).append(index)
        for indices in by_shape.values():
            for chunk in self._batches(indices, items):
                for index, result in zip(chunk, self._classify_batch([items[i] for i in chunk])):
                    results[index] = result
        return results

    def _batches(self, indices: list[int], items: Sequence[ClassifyItem]) -> list[list[int]]:
        """Runs of at most max_batch_size rows and at most one adapter per slot."""
        batches: list[list[int]] = [[]]
        adapters: set[str] = set()
        for index in indices:
            key = items[index].adapter.key if items[index].adapter is not None else None
            full = len(batches[-1]) == self.max_batch_size
            if full or (key is not None and key not in adapters and len(adapters) == self.slots.count):
                batches.append([])
                adapters = set()
            batches[-1].append(index)
            if key is not None:
                adapters.add(key)
        return batches

    def _classify_batch(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        # Every adapter of the batch is held while it runs, resident ones before any load, so
        # loading one row's adapter never evicts another row's.
        held = list(dict.fromkeys(item.adapter.key for item in items if item.adapter is not None))
        for key in held:
            self.slots.users[key] += 1
        try:
            slots = [self.load_adapter(item.adapter) if item.adapter is not None else 0 for item in items]
            pixels = torch.from_numpy(np.stack([item.pixels for item in items]))  # [rows, 3, H, W]
            pixels = pixels.to(self.device, self.base.dtype)
            self.holder.plan = RowPlan.build(slots, self.device)
            try:
                features = self.base.model(pixel_values=pixels).logits.float()  # [rows, hidden]
            finally:
                self.holder.plan = None
        finally:
            for key in held:
                self.slots.users[key] -= 1
        results = []
        for row, item in enumerate(items):
            if item.adapter is not None:
                weight, bias, labels = self.slots.heads[item.adapter.key]
            elif self.base.base_head is not None:
                (weight, bias), labels = self.base.base_head, self.base.base_labels
            else:
                raise ValueError(f"{self.info.base_id} has no trained head: classification needs an adapter")
            logits = features[row] @ weight.T + (bias if bias is not None else 0)  # [num_labels]
            probs = logits.softmax(-1)
            best = int(probs.argmax())
            values = probs.tolist()
            results.append(ClassifyResult(label=labels[best], score=values[best],
                                          scores=dict(zip(labels, values)), prompt_tokens=0))
        return results
