"""The vision engine gives PEFT's probabilities (fp32, atol 1e-5), alone and with every row of a
mixed batch on its own adapter in one forward; heads of different label counts side by side."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image

from adapters.images import Preprocessing
from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, ClassifyItem
from server.engine.vision import VisionEngine, load_vision_base
from server.errors import AdapterLoadFailed
from tests.unit.vision.conftest import base_with_head, image_bytes

ARCHES = ["mobilenet_v2", "resnet", "vit"]


def engine_for(base_dir, tmp_path, slots: int = 4) -> VisionEngine:
    return VisionEngine(load_vision_base(str(base_dir), tmp_path / "cache"), max_batch_size=8,
                        max_device_adapters=slots)


def binding(engine: VisionEngine, directory, name: str) -> AdapterBinding:
    package = load_adapter_dir(directory, name, engine.signature)
    return AdapterBinding(name, package.manifest.version, package.key, package)


def pixels(base_dir, seed: int) -> np.ndarray:
    return Preprocessing.from_folder(base_dir)(Image.open(io.BytesIO(image_bytes(seed))))


def peft_probabilities(base_dir, adapter_dir, num_labels: int, images: list[np.ndarray]) -> torch.Tensor:
    model = PeftModel.from_pretrained(base_with_head(base_dir, num_labels), adapter_dir).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(np.stack(images))).logits.softmax(-1)


@pytest.mark.parametrize("arch", ARCHES)
def test_mixed_batch_matches_peft_row_by_row(arch, vision_bases, vision_adapters, tmp_path):
    base_dir, adapters = vision_bases[arch], vision_adapters[arch]
    engine = engine_for(base_dir, tmp_path)
    two, five = binding(engine, adapters["two"], "two"), binding(engine, adapters["five"], "five")
    images = [pixels(base_dir, seed) for seed in range(4)]
    expected = {"two": peft_probabilities(base_dir, adapters["two"], 2, images),
                "five": peft_probabilities(base_dir, adapters["five"], 5, images)}

    # Alone, then interleaved in one batch (one forward: 4 rows on `two`, 4 on `five`).
    alone = engine.classify([ClassifyItem("", two, image) for image in images])
    mixed = engine.classify([ClassifyItem("", b, image) for image in images for b in (two, five)])
    for row, result in enumerate(alone):
        assert result.scores.keys() == {"LABEL_0", "LABEL_1"}
        np.testing.assert_allclose(list(result.scores.values()), expected["two"][row].numpy(), atol=1e-5)
    for index, result in enumerate(mixed):
        row, name = divmod(index, 2)
        name = ("two", "five")[name]
        np.testing.assert_allclose(list(result.scores.values()), expected[name][row].numpy(), atol=1e-5)
    assert list(mixed[1].scores) == ["a", "b", "c", "d", "e"]  # labels from the adapter's config.json
    # The adapters must matter: the same head over the bare backbone gives other numbers.
    assert not torch.allclose(expected["two"], _head_only(base_dir, adapters["two"], images), atol=1e-3)


def _head_only(base_dir, adapter_dir, images) -> torch.Tensor:
    """PEFT's model with every LoRA disabled: only the adapter's head."""
    model = PeftModel.from_pretrained(base_with_head(base_dir, 2), adapter_dir).eval()
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {name: 0.0 for name in module.scaling}
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(np.stack(images))).logits.softmax(-1)


def test_base_head_answers_rows_without_adapter(vision_bases, vision_adapters, tmp_path):
    base_dir = vision_bases["mobilenet_v2"]
    engine = engine_for(base_dir, tmp_path)
    assert engine.info.kind == "vision" and engine.info.base_labels == tuple(f"class-{i}" for i in range(6))
    two = binding(engine, vision_adapters["mobilenet_v2"]["two"], "two")
    image = pixels(base_dir, 7)
    from transformers import AutoModelForImageClassification

    reference = AutoModelForImageClassification.from_pretrained(base_dir).eval()
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(image[None])).logits.softmax(-1)[0]
    base_row, adapter_row = engine.classify([ClassifyItem("", None, image), ClassifyItem("", two, image)])
    np.testing.assert_allclose(list(base_row.scores.values()), expected.numpy(), atol=1e-5)
    assert len(adapter_row.scores) == 2


def test_slots_are_reused_lru_and_evicted_adapters_leave_no_trace(vision_bases, vision_adapters, tmp_path):
    base_dir, adapters = vision_bases["resnet"], vision_adapters["resnet"]
    engine = engine_for(base_dir, tmp_path, slots=1)
    two, five = binding(engine, adapters["two"], "two"), binding(engine, adapters["five"], "five")
    image = pixels(base_dir, 3)
    first = engine.classify([ClassifyItem("", two, image)])[0]
    assert engine.resident_adapters() == {two.key: False}
    engine.classify([ClassifyItem("", five, image)])  # one slot: `two` is evicted
    assert engine.resident_adapters() == {five.key: False}
    again = engine.classify([ClassifyItem("", two, image)])[0]
    assert again.scores == pytest.approx(first.scores, abs=1e-6)
    # Two adapters in one call with one slot: run one after the other, each row on its own.
    both = engine.classify([ClassifyItem("", two, image), ClassifyItem("", five, image)])
    assert both[0].scores == pytest.approx(first.scores, abs=1e-6) and len(both[1].scores) == 5
    activity = engine.take_device_tier_activity()
    assert (activity.misses, activity.evictions) == (4, 3) and len(activity.load_seconds) == 4
    assert engine.take_device_tier_activity().misses == 0  # taken once
    assert engine.hold_adapter(five.key, True)
    with pytest.raises(AdapterLoadFailed, match="held"):
        engine.classify([ClassifyItem("", two, image)])


def test_the_device_byte_budget_evicts_least_recently_used(vision_bases, vision_adapters, tmp_path):
    base_dir, adapters = vision_bases["vit"], vision_adapters["vit"]
    engine = engine_for(base_dir, tmp_path, slots=4)
    two, five = binding(engine, adapters["two"], "two"), binding(engine, adapters["five"], "five")
    engine.device_budget_bytes = max(two.package.nbytes, five.package.nbytes)  # room for one
    image = pixels(base_dir, 5)
    engine.classify([ClassifyItem("", two, image)])
    engine.classify([ClassifyItem("", five, image)])
    assert list(engine.resident_adapters()) == [five.key]
    engine.take_device_tier_activity()
    # Both in one batch: held while it runs, so the budget is exceeded rather than a row evicted.
    engine.classify([ClassifyItem("", two, image), ClassifyItem("", five, image)])
    assert set(engine.resident_adapters()) == {two.key, five.key}
    assert engine.take_device_tier_activity().evictions == 0


def test_generation_is_not_served(vision_bases, tmp_path):
    engine = engine_for(vision_bases["vit"], tmp_path)
    assert not engine.has_work() and engine.step() == []
    with pytest.raises(ValueError, match="image classifier"):
        engine.tokenize("hello", None)


def test_repeated_label_names_stay_apart():
    from adapters.bases import distinct_labels, imagenet_labels

    assert distinct_labels(["cat", "crane", "dog", "crane"]) == ["cat", "crane (1)", "dog", "crane (3)"]
    labels = imagenet_labels()
    assert len(set(labels)) == 1000 and labels[134] == "crane (134)" and labels[698] == "palace"
