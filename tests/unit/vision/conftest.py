"""Tiny random image classifiers (MobileNetV2, ResNet, ViT) with their image processor configs,
PEFT LoRA classifiers made for them with plain PEFT, and test images; all built offline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.images import PREPROCESSOR_FILE
from tests.conftest import save_peft_adapter

# A crop (MobileNetV2-style) and an exact resize (ViT-style): both kinds of processor config.
CROP_PROCESSOR = {"do_resize": True, "size": {"shortest_edge": 36}, "resample": 2, "do_center_crop": True,
                  "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                  "image_processor_type": "MobileNetV2ImageProcessor"}
RESIZE_PROCESSOR = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}

# Per architecture: what a PEFT user targets. MobileNetV2: the pointwise convs plus the 3x3
# stride-2 stem conv (groups=1); ResNet: every conv (7x7 stride 2 stem, 3x3, 1x1 shortcuts);
# ViT: attention and MLP linears and the patch embedding (a 8x8 stride-8 conv).
TARGETS = {
    "mobilenet_v2": r".*(first_conv|expand_1x1|reduce_1x1|conv_1x1)\.convolution",
    "resnet": ["convolution"],
    "vit": ["q_proj", "v_proj", "fc1", "fc2", "projection"],
}


def _config(arch: str, num_labels: int):
    from transformers import MobileNetV2Config, ResNetConfig, ViTConfig

    labels = {"id2label": {i: f"class-{i}" for i in range(num_labels)},
              "label2id": {f"class-{i}": i for i in range(num_labels)}}
    if arch == "mobilenet_v2":
        return MobileNetV2Config(image_size=32, depth_multiplier=0.35, min_depth=4, tf_padding=False,
                                 layer_norm_eps=1e-5, num_labels=num_labels, **labels)
    if arch == "resnet":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            num_labels=num_labels, **labels)
    return ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels, **labels)


def build_vision_base(directory: Path, arch: str, num_labels: int = 6, seed: int = 0) -> Path:
    """A random *ForImageClassification with non-trivial BatchNorm statistics, saved with its processor."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(_config(arch, num_labels))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # identity statistics would hide a BN in train mode
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    processor = RESIZE_PROCESSOR if arch == "vit" else CROP_PROCESSOR
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(processor))
    return directory


def make_vision_lora(base_dir: Path, out_dir: Path, arch: str, *, num_labels: int, r: int = 4, seed: int = 0,
                     labels: list[str] | None = None, weight_scale: float = 0.5) -> Path:
    """A plain-PEFT LoRA classifier for the base: random A and B, a new head in modules_to_save."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = base_with_head(base_dir, num_labels)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch], init_lora_weights=False,
                        modules_to_save=["classifier"])
    return save_peft_adapter(get_peft_model(model, config), out_dir, weight_scale, labels)


def base_with_head(base_dir: Path, num_labels: int):
    """The base with a fresh `num_labels` head: what a PEFT user starts from for a new task."""
    import warnings

    from transformers import AutoModelForImageClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageClassification.from_pretrained(
            base_dir, num_labels=num_labels, ignore_mismatched_sizes=True,
            id2label={i: f"LABEL_{i}" for i in range(num_labels)}, label2id={f"LABEL_{i}": i for i in range(num_labels)},
        )


def image_bytes(seed: int, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    spin-waits make two threads several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vision_bases(tmp_path_factory) -> dict[str, Path]:
    return {arch: build_vision_base(tmp_path_factory.mktemp(f"tiny-{arch}"), arch) for arch in TARGETS}


@pytest.fixture(scope="session")
def vision_adapters(vision_bases, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: `two` (2 labels, r=4) and `five` (5 labels, r=8, named labels)."""
    adapters = {}
    for arch, base in vision_bases.items():
        store = tmp_path_factory.mktemp(f"{arch}-adapters")
        adapters[arch] = {
            "two": make_vision_lora(base, store / "two", arch, num_labels=2, r=4, seed=1),
            "five": make_vision_lora(base, store / "five", arch, num_labels=5, r=8, seed=2,
                                     labels=["a", "b", "c", "d", "e"]),
        }
    return adapters
