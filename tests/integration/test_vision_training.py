"""Training on the real mobilenet-v2 (slow: minutes on 2 cores): a LoRA digit classifier from an
image folder reaches the accuracy the example promises, far above its untrained head."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainer.cli import main as trainer_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_lora_on_mobilenet_v2_learns_digits_from_an_image_folder(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from make_examples import write_digit_images

    write_digit_images(tmp_path / "digits")
    # Three digits, a quarter of their images: minutes, not the example's half hour.
    for folder in (tmp_path / "digits").glob("*/*"):
        keep = set(sorted(folder.iterdir())[::4]) if folder.name in ("3", "5", "8") else set()
        for image in set(folder.iterdir()) - keep:
            image.unlink()
        if not keep:
            folder.rmdir()
    code = trainer_main([
        "train", str(tmp_path / "digits" / "train"), "--validation-file", str(tmp_path / "digits" / "test"),
        "--task", "image-classify", "--base", "mobilenet-v2", "-o", str(tmp_path / "out"), "--epochs", "1",
        "--batch-size", "16", "--lr", "1e-3", "--threads", "1",
        "--target-modules", r".*\.(layer\.1[3-5]\.(expand_1x1|reduce_1x1)|conv_1x1)\.convolution",
    ])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["accuracy"] >= 0.85
    assert report["base_metrics"]["untrained_head_accuracy"] < 0.6
