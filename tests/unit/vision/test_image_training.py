"""`adaptserve train --task image-classify`: image-folder and CSV/JSONL data, LoRA on a tiny
random vision base with BatchNorm frozen, the linear-probe baseline in the report, and an
adapter that the vision engine serves with PEFT's probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, ClassifyItem
from server.engine.vision import VisionEngine, load_vision_base
from tests.unit.vision.conftest import base_with_head
from trainer.cli import main as trainer_main
from trainer.data import DataError
from trainer import vision
from trainer.vision import load_image_examples, open_image


def digit_folder(root, per_class: int = 24, classes=(0, 1, 7)):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        folder = root / f"digit-{digit}"
        folder.mkdir(parents=True)
        for n, index in enumerate(i for i, t in enumerate(digits.target) if t == digit):
            if n == per_class:
                break
            Image.fromarray((255 - digits.images[index] * 255 / 16).astype(np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def trained(vision_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data = digit_folder(root / "images")
    out = root / "digit-lora"
    code = trainer_main(["train", str(data), "--task", "image-classify", "--base", str(vision_bases["mobilenet_v2"]),
                         "-o", str(out), "--epochs", "2", "--batch-size", "16", "--lr", "5e-3", "--rank", "4",
                         "--eval-batch-size", "32", "--threads", "1"])
    assert code == 0
    return data, out


def test_several_seeds_train_and_the_best_one_is_the_package(vision_bases, tmp_path):
    data = digit_folder(tmp_path / "images", per_class=8)
    out = tmp_path / "seeds"
    code = trainer_main(["train", str(data), "--task", "image-classify", "--base", str(vision_bases["mobilenet_v2"]),
                         "-o", str(out), "--epochs", "1", "--batch-size", "16", "--rank", "4", "--seeds", "2",
                         "--eval-batch-size", "32", "--threads", "1"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "manifest.json").is_file()


def test_train_writes_a_served_classifier_with_its_linear_probe_baseline(trained, vision_bases):
    _, out = trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "classify" and manifest["labels"] == ["digit-0", "digit-1", "digit-7"]
    report = json.loads((out / "report.json").read_text())
    assert report["base_metrics"]["baseline"] == "linear probe on the frozen base"
    assert 0 <= report["base_metrics"]["untrained_head_accuracy"] <= 1
    assert report["request"]["field"] == "images" and "-F image=@" in report["request"]["curl"]
    markdown = (out / "report.md").read_text()
    assert "| metric | linear probe on the frozen base |" in markdown and "untrained" in markdown
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and "expand_1x1" in config["target_modules"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    # Only LoRA and the head are saved: BatchNorm statistics are the base's and were never trained.
    assert not any("normalization" in k or "running" in k for k in keys)
    assert any(k.endswith("classifier.weight") for k in keys)


def test_the_trained_adapter_serves_with_peft_probabilities(trained, vision_bases, tmp_path):
    data, out = trained
    base_dir = vision_bases["mobilenet_v2"]
    engine = VisionEngine(load_vision_base(str(base_dir), tmp_path), max_batch_size=8, max_device_adapters=2)
    package = load_adapter_dir(out, "digit-lora", engine.signature)
    binding = AdapterBinding("digit-lora", package.manifest.version, package.key, package)
    examples = load_image_examples(data)[:5]
    pixels = [open_image(e, engine.preprocessing).numpy() for e in examples]
    served = engine.classify([ClassifyItem("", binding, p) for p in pixels])
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_with_head(base_dir, 3), out).eval()
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(np.stack(pixels))).logits.softmax(-1).numpy()
    for row, result in enumerate(served):
        np.testing.assert_allclose(list(result.scores.values()), expected[row], atol=1e-5)
        assert list(result.scores) == ["digit-0", "digit-1", "digit-7"]


def test_csv_and_jsonl_listings_and_every_bad_row_reported(trained, tmp_path):
    data, _ = trained
    images = sorted(data.rglob("*.png"))[:2]
    listing = tmp_path / "data.csv"
    listing.write_text("path,label\n" + f"{images[0]},a\n" + "missing.png,b\n" + f"{images[1]},\n")
    with pytest.raises(DataError) as caught:
        load_image_examples(listing)
    assert [line for _, line, _ in caught.value.problems] == [3, 4]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"image": str(images[0]), "label": 3}) + "\n")
    [example] = load_image_examples(jsonl)
    assert example.label == "3" and example.path == images[0]
    with pytest.raises(DataError, match="subfolder per class"):
        load_image_examples(data / "digit-0")


def test_batchnorm_stays_in_eval_mode_while_training(vision_bases):
    from adapters.bases import resolve_base
    from trainer.config import TrainConfig
    from trainer.vision import apply_image_method, freeze_batchnorm, load_image_model

    model = load_image_model(resolve_base(str(vision_bases["resnet"])), ["a", "b"])
    model = apply_image_method(model, TrainConfig(train_file="x", output_dir="/tmp/x", task="image-classify"))
    freeze_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


def test_compare_sets_last_n_layers_and_lora_beside_the_linear_probe(trained, vision_bases, tmp_path, monkeypatch):
    data, _ = trained
    probes = []
    fit = vision.linear_probe
    monkeypatch.setattr(vision, "linear_probe", lambda *args: (probes.append(1), fit(*args))[1])
    code = trainer_main(["compare", str(data), "--task", "image-classify", "--base", str(vision_bases["resnet"]),
                         "-o", str(tmp_path / "cmp"), "--epochs", "1", "--batch-size", "16", "--last-n-layers", "1",
                         "--eval-batch-size", "32", "--threads", "1"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["methods"]}
    assert list(rows) == ["last-n-layers", "lora", "linear-probe"]
    assert rows["lora"]["serving"] == "batched" and rows["last-n-layers"]["serving"] == "not-served"
    # The probe trains the head alone: the fewest parameters of the three.
    assert rows["linear-probe"]["trainable_percent"] < rows["lora"]["trainable_percent"]
    assert "| linear-probe | baseline |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert len(probes) == 1  # fitted for the first method, reused by the second
