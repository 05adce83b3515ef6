"""/v1/classify on a vision base over real HTTP: base64 JSON and multipart files give PEFT's
probabilities; fan-out, per-request and stored merges, routes and uploads work as for text
classifiers; bad images are refused on their header with a 4xx and a code, and the server
keeps answering."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image

from adapters.images import Preprocessing
from tests.conftest import ADMIN_TOKEN, start_server, stop_server, tiny_settings
from tests.unit.vision.conftest import base_with_head, image_bytes, make_vision_lora

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ARCH = "mobilenet_v2"


@pytest.fixture(scope="module")
def vision_server(vision_bases, vision_adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("vision-store")
    for name, directory in vision_adapters[ARCH].items():
        shutil.copytree(directory, store / name)
    # Same labels as `two`: a classify merge needs equal heads.
    make_vision_lora(vision_bases[ARCH], store / "two-b", ARCH, num_labels=2, r=2, seed=5)
    settings = tiny_settings(vision_bases[ARCH], store, tmp_path_factory.mktemp("vision-srv"),
                             admin_token=ADMIN_TOKEN, max_image_pixels=200 * 200, max_classify_inputs=8)
    running = start_server(settings)
    yield running
    stop_server(running)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def peft_scores(base_dir, adapter_dir, num_labels: int, images: list[bytes]) -> np.ndarray:
    preprocess = Preprocessing.from_folder(base_dir)
    batch = torch.from_numpy(np.stack([preprocess(Image.open(io.BytesIO(i))) for i in images]))
    model = PeftModel.from_pretrained(base_with_head(base_dir, num_labels), adapter_dir).eval()
    with torch.no_grad():
        return model(pixel_values=batch).logits.softmax(-1).numpy()


def scores(result: dict) -> list[float]:
    return list(result["scores"].values())


def test_base64_and_multipart_give_peft_probabilities(vision_server, vision_bases, vision_adapters):
    images = [image_bytes(1), image_bytes(2, size=(64, 30), fmt="JPEG")]
    expected = peft_scores(vision_bases[ARCH], vision_adapters[ARCH]["five"], 5, images)
    with vision_server.client() as client:
        # A data: URL and a line-wrapped payload (what `base64 FILE` prints) both decode.
        wrapped = "\n".join(b64(images[1])[i:i + 76] for i in range(0, len(b64(images[1])), 76))
        body = {"images": ["data:image/png;base64," + b64(images[0]), wrapped], "adapter": "five"}
        as_json = client.post("/v1/classify", json=body)
        files = [("image", ("a.png", images[0], "image/png")), ("image", ("b.jpg", images[1], "image/jpeg"))]
        as_form = client.post("/v1/classify", data={"adapter": "five"}, files=files)
    for response in (as_json, as_form):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert response.json()["adapter"]["name"] == "five"
        for row, result in enumerate(results):
            np.testing.assert_allclose(scores(result), expected[row], atol=1e-5)
            assert result["label"] == "abcde"[int(expected[row].argmax())]


def test_fanout_runs_every_adapter_on_every_image(vision_server, vision_bases, vision_adapters):
    images = [image_bytes(3), image_bytes(4)]
    with vision_server.client() as client:
        response = client.post("/v1/classify", data={"adapters": ["two", "five"]},
                               files=[("file", ("x.png", images[0])), ("file", ("y.png", images[1]))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert [a["name"] for a in body["adapters"]] == ["two", "five"]
    two = peft_scores(vision_bases[ARCH], vision_adapters[ARCH]["two"], 2, images)
    for row, per_input in enumerate(body["results"]):
        assert [len(r["scores"]) for r in per_input["results"]] == [2, 5]
        np.testing.assert_allclose(scores(per_input["results"][0]), two[row], atol=1e-5)


def test_without_an_adapter_the_base_head_answers(vision_server):
    with vision_server.client() as client:
        response = client.post("/v1/classify", json={"images": b64(image_bytes(5))})
    assert response.status_code == 200, response.text
    assert response.json()["adapter"] is None
    assert set(response.json()["results"][0]["scores"]) == {f"class-{i}" for i in range(6)}


def tiny_png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height over a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("images, status, code", [
    ([tiny_png_declaring(100_000, 100_000)], 413, "image_too_large"),  # past PIL's own bomb guard too
    ([tiny_png_declaring(300, 300)], 413, "image_too_large"),  # past --max-image-pixels only
    ([image_bytes(6, size=(250, 250))], 413, "image_too_large"),  # a real image, too many pixels
    ([gif_bytes()], 415, "unsupported_image_format"),  # GIF is not in the default allowlist
    ([b"%PDF-1.4 not an image"], 415, "unsupported_image_format"),
    ([image_bytes(7)[:60]], 400, "invalid_image"),  # a valid header, truncated pixel data
    ([b""], 400, "invalid_image"),
])
def test_bad_images_are_refused_with_a_code_and_nothing_else_is_disturbed(vision_server, images, status, code):
    with vision_server.client() as client:
        bad = client.post("/v1/classify", json={"images": [b64(image_bytes(8))] + [b64(i) for i in images],
                                                "adapter": "two"})
        assert bad.status_code == status, bad.text
        assert bad.json()["error"]["code"] == code and bad.json()["error"]["param"] == "images.1"
        as_file = client.post("/v1/classify", data={"adapter": "two"}, files=[("image", ("bad", images[0]))])
        assert (as_file.status_code, as_file.json()["error"]["code"]) == (status, code)
        good = client.post("/v1/classify", json={"images": [b64(image_bytes(8))], "adapter": "two"})
        assert good.status_code == 200


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/classify", {"images": ["not base64!"], "adapter": "two"}, 400, "invalid_image"),
    ("/v1/classify", {"inputs": ["a text"], "adapter": "two"}, 400, "unsupported_for_base"),
    ("/v1/classify", {"images": [], "adapter": "two"}, 422, "limit_exceeded"),
    ("/v1/classify", {"adapter": "two"}, 422, "invalid_parameter"),
    ("/v1/classify", {"images": ["x"] * 9, "adapter": "two"}, 422, "limit_exceeded"),
    ("/v1/generate", {"prompt": "hello"}, 400, "unsupported_for_base"),
    ("/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "unsupported_for_base"),
])
def test_requests_a_vision_base_cannot_serve(vision_server, path, body, status, code):
    with vision_server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_a_form_with_no_file_or_unknown_fields_is_a_422(vision_server):
    with vision_server.client() as client:
        no_file = client.post("/v1/classify", data={"adapter": "two"}, files=[])
        assert no_file.status_code == 422  # httpx sends a urlencoded body without files
        extra = client.post("/v1/classify", data={"adapter": "two", "colour": "red"},
                            files=[("image", ("a.png", image_bytes(1)))])
        assert extra.status_code == 422 and extra.json()["error"]["param"] == "body.colour"


def test_merges_routes_and_uploads_work_as_for_text_classifiers(vision_server, vision_bases, tmp_path):
    image = image_bytes(9)
    with vision_server.client(headers=ADMIN) as client:
        merged = client.post("/v1/classify", json={"images": [b64(image)], "adapters": [
            {"name": "two", "weight": 0.5}, {"name": "two-b", "weight": 0.5}], "merge": {"method": "cat"}})
        assert merged.status_code == 200, merged.text
        stored = client.post("/v1/adapters/merge", json={
            "name": "two-mix", "sources": [{"name": "two", "weight": 0.5}, {"name": "two-b", "weight": 0.5}],
            "method": "cat"})
        assert stored.status_code in (200, 201), stored.text
        served = client.post("/v1/classify", json={"images": [b64(image)], "adapter": "two-mix"}).json()
        np.testing.assert_allclose(scores(served["results"][0]), scores(merged.json()["results"][0]), atol=1e-5)

        assert client.put("/v1/routes/kind", json={"adapter": "two-mix"}).status_code == 200
        routed = client.post("/v1/classify", json={"images": [b64(image)], "task": "kind"})
        assert routed.status_code == 200 and routed.json()["task"] == "kind"

        fresh = make_vision_lora(vision_bases[ARCH], tmp_path / "fresh", ARCH, num_labels=3, seed=11)
        upload = client.post("/v1/adapters", data={"name": "fresh"}, files=[
            ("adapter_config.json", ("adapter_config.json", (fresh / "adapter_config.json").read_bytes())),
            ("adapter_model.safetensors", ("adapter_model.safetensors",
                                           (fresh / "adapter_model.safetensors").read_bytes()))])
        assert upload.status_code == 201, upload.text
        answer = client.post("/v1/classify", json={"images": [b64(image)], "adapter": "fresh"})
        assert answer.status_code == 200 and len(answer.json()["results"][0]["scores"]) == 3
        # Tiers: pinned into a device slot, then dropped back to the host tier.
        assert client.post("/v1/adapters/fresh/pin").status_code == 200
        assert client.get("/v1/adapters/fresh").json()["status"] == "device"
        assert client.post("/v1/adapters/fresh/unpin").status_code == 200
        assert client.post("/v1/adapters/fresh/unload").status_code == 200
        assert client.get("/v1/adapters/fresh").json()["status"] == "stored"  # unload drops both tiers
    # The stored merge is a real PEFT folder: PEFT itself loads it and agrees with the server.
    version = vision_server.services.settings.adapters_dir / "two-mix" / "versions" / stored.json()["version"]
    np.testing.assert_allclose(scores(served["results"][0]),
                               peft_scores(vision_bases[ARCH], version, 2, [image])[0], atol=1e-5)


def test_models_and_metrics_describe_the_vision_base(vision_server):
    with vision_server.client() as client:
        client.post("/v1/classify", json={"images": [b64(image_bytes(10))], "adapter": "five"})
        models = client.get("/v1/models").json()["data"]
        metrics = client.get("/metrics")
    assert models[0]["parent"] is None and models[0]["task"] == "image-classify"
    assert {m["id"]: m["task"] for m in models[1:]}["five"] == "classify"
    assert metrics.status_code == 200
    assert 'adaptserve_requests_total{adapter="five",endpoint="/v1/classify",status="200"}' in metrics.text
