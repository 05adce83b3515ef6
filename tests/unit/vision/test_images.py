"""adapters/images.py: preprocessing equals transformers' image processors pixel for pixel (the
contract with PEFT users), and images are refused on their header before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from adapters.images import ImagePolicy, ImageRejected, Preprocessing, decode_image


def processors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import ConvNextImageProcessor, MobileNetV2ImageProcessor, ViTImageProcessor

        return [
            MobileNetV2ImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
            ViTImageProcessor(),  # exact resize to 224 x 224, mean/std 0.5
            ConvNextImageProcessor(size={"shortest_edge": 224}),  # crop_pct: resize 256, crop 224, bicubic
            ConvNextImageProcessor(),  # 384: a square resize, no crop
            MobileNetV2ImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 48, "width": 30}),  # padded crop
        ]


@pytest.mark.parametrize("processor", processors(), ids=lambda p: f"{type(p).__name__}-{p.size}")
def test_preprocessing_equals_transformers_image_processors(processor):
    ours = Preprocessing.from_config(processor.to_dict())
    rng = np.random.default_rng(0)
    for width, height in [(300, 200), (28, 28), (8, 8), (225, 1000), (641, 427)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = processor(image, return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6)
    grey = Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8))  # converted to RGB, as transformers does
    np.testing.assert_allclose(ours(grey), processor(grey.convert("RGB"), return_tensors="np")["pixel_values"][0],
                               atol=1e-6)


def test_configs_it_would_get_wrong_are_refused():
    with pytest.raises(ValueError, match="do_pad"):
        Preprocessing.from_config({"size": {"height": 8, "width": 8}, "do_pad": True})
    with pytest.raises(ValueError, match="size"):
        Preprocessing.from_config({"size": {"longest_edge": 8}})


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decoding_checks_format_and_declared_pixels_before_decoding(monkeypatch):
    policy = ImagePolicy(formats=("PNG", "JPEG"), max_pixels=100 * 100)
    picture = Image.new("RGB", (20, 10), (200, 10, 10))
    assert decode_image(encode(picture, "PNG"), policy).size == (20, 10)
    assert decode_image(encode(picture.convert("L"), "JPEG"), policy).mode == "RGB"
    for fmt in ("GIF", "BMP", "WEBP"):
        with pytest.raises(ImageRejected) as caught:
            decode_image(encode(picture, fmt), policy)
        assert caught.value.code == "unsupported_image_format"
    # Declared past the cap: refused on the header, so no decoder ever runs.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded before the size check"))
    for declared in ((101, 100), (100_000, 100_000)):
        with pytest.raises(ImageRejected) as caught:
            decode_image(png_declaring(*declared), policy)
        assert caught.value.code == "image_too_large"


def test_corrupt_or_empty_files_are_invalid_images():
    policy = ImagePolicy()
    whole = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    for data in (b"", whole[:80], b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(ImageRejected) as caught:
            decode_image(data, policy)
        assert caught.value.code in ("invalid_image", "unsupported_image_format")
    with pytest.raises(ImageRejected) as caught:
        decode_image(whole[:80], policy)
    assert caught.value.code == "invalid_image"
