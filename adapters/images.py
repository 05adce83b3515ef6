"""Images for vision bases: checked before they are decoded, then preprocessed exactly as
the base's image processor config says.

Shared by the server (API worker threads) and the trainer, so an adapter sees at serving
time the very pixels it was trained on. Nothing here imports torch: the output is a numpy
array, `pixel_values` of one image as float32 [3, height, width].

Order of the checks (nothing is decoded before they pass):
1. the bytes are opened with only the allowed formats' decoders (`ImagePolicy.formats`);
2. PIL reads the header alone: the declared width x height is compared with
   `ImagePolicy.max_pixels` (a 50-byte PNG can declare 100,000 x 100,000 pixels);
3. only then are the pixels decoded (the first frame of an animation), and PIL's own
   decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) is held to the same bound.

`Preprocessing` mirrors transformers' PIL image processors (`*ImageProcessorPil`): resize
(shortest edge, or height x width; ConvNeXt's `crop_pct`), center crop, rescale, normalize,
in that order, with PIL doing the resampling on 8-bit RGB as transformers does.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RejectionCode = Literal["unsupported_image_format", "image_too_large", "invalid_image"]


class ImageRejected(ValueError):
    """An image refused before (or while) decoding; `code` says why, for the API's error table."""

    def __init__(self, code: RejectionCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    formats: tuple[str, ...] = DEFAULT_FORMATS  # PIL format names, upper case
    max_pixels: int = 4096 * 4096  # declared width x height, checked on the header


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """The first frame of `data` as an RGB image, or ImageRejected; see the module docstring."""
    if not data:
        raise ImageRejected("invalid_image", "the image is empty")
    try:
        # `formats` restricts which decoders even look at the bytes.
        image = Image.open(io.BytesIO(data), formats=list(policy.formats))
    except UnidentifiedImageError:
        raise ImageRejected(
            "unsupported_image_format", f"not an image in an accepted format ({', '.join(policy.formats)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_too_large", str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("invalid_image", f"unreadable image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("invalid_image", f"the image declares {width}x{height} pixels")
    if width * height > policy.max_pixels:
        raise ImageRejected(
            "image_too_large", f"the image declares {width}x{height} = {width * height} pixels; "
            f"the limit is {policy.max_pixels}"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns (then raises) past its own bound; with ours checked first this only
            # fires for a frame larger than its header said.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_large", str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt pixel data behind a valid header.
        raise ImageRejected("invalid_image", f"the image data is corrupt: {exc}") from None


# Options of transformers' image processors that change the pixels in ways not implemented here.
_UNSUPPORTED_OPTIONS = ("do_pad", "do_reduce_labels", "do_flip_channel_order", "do_thumbnail", "do_align_long_axis")
_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(frozen=True)
class Preprocessing:
    """One image -> pixel_values [3, height, width] float32, as the base's processor config says."""

    do_resize: bool = True
    shortest_edge: int | None = None  # resize keeping the aspect ratio...
    resize_to: tuple[int, int] | None = None  # ...or to exactly (height, width)
    crop_pct: float | None = None  # ConvNeXt's rule, applied when shortest_edge < 384
    resample: int = 2  # PIL's numbering (2 = bilinear)
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Preprocessing":
        """From a `preprocessor_config.json` mapping; refuses options it would silently get wrong."""
        problems = [f"{key}=true" for key in _UNSUPPORTED_OPTIONS if config.get(key)]
        size = config.get("size") or {}
        if isinstance(size, int):  # older configs give one number
            size = {"shortest_edge": size} if config.get("default_to_square") is False else {"height": size, "width": size}
        shortest = size.get("shortest_edge")
        resize_to = (size["height"], size["width"]) if "height" in size and "width" in size else None
        if config.get("do_resize", True) and shortest is None and resize_to is None:
            problems.append(f"size {size!r} (needs shortest_edge, or height and width)")
        crop = config.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        crop_size = (crop["height"], crop["width"]) if "height" in crop and "width" in crop else None
        crop_pct = config.get("crop_pct") if "ConvNext" in str(config.get("image_processor_type", "")) else None
        if crop_pct is not None and shortest is None:
            problems.append("crop_pct without size.shortest_edge")
        if config.get("do_center_crop") and crop_size is None:
            problems.append("do_center_crop without crop_size")
        if problems:
            raise ValueError("image processor options not supported: " + ", ".join(problems))

        def triple(values: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
            if values is None:
                return default
            values = [values] * 3 if isinstance(values, (int, float)) else list(values)
            if len(values) != 3:
                raise ValueError(f"image_mean/image_std must have 3 values, got {values!r}")
            return tuple(float(v) for v in values)

        return cls(
            do_resize=bool(config.get("do_resize", True)),
            shortest_edge=shortest,
            resize_to=None if shortest is not None else resize_to,
            crop_pct=float(crop_pct) if crop_pct is not None else None,
            resample=int(config.get("resample", 2)),
            do_center_crop=bool(config.get("do_center_crop", False)),
            crop_size=crop_size,
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=triple(config.get("image_mean"), IMAGENET_DEFAULT_MEAN),
            image_std=triple(config.get("image_std"), IMAGENET_DEFAULT_STD),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "Preprocessing":
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a vision base needs its image processor config")
        return cls.from_config(json.loads(path.read_text(encoding="utf-8")))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, when the config fixes it (crop or exact resize)."""
        if self.do_center_crop:
            return self.crop_size
        if self.crop_pct is not None and self.shortest_edge < 384:
            return (self.shortest_edge, self.shortest_edge)
        return self.resize_to if self.do_resize else None

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        crop = self.crop_size if self.do_center_crop else None
        if self.do_resize:
            if self.crop_pct is not None and self.shortest_edge < 384:
                image = self._resize(image, _shortest_edge_size(image, int(self.shortest_edge / self.crop_pct)))
                crop = (self.shortest_edge, self.shortest_edge)
            elif self.crop_pct is not None:  # ConvNeXt at >= 384: a plain square resize, no crop
                image = self._resize(image, (self.shortest_edge, self.shortest_edge))
            elif self.shortest_edge is not None:
                image = self._resize(image, _shortest_edge_size(image, self.shortest_edge))
            else:
                image = self._resize(image, self.resize_to)
        pixels = np.asarray(image).transpose(2, 0, 1)  # [3, height, width] uint8
        if crop is not None:
            pixels = _center_crop(pixels, crop)
        values = pixels.astype(np.float32)
        if self.do_rescale:
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        height, width = size
        return image.resize((width, height), resample=_RESAMPLE.get(self.resample, Image.Resampling.BILINEAR))

    def to_config(self) -> dict[str, Any]:
        """A `preprocessor_config.json` that transformers' processors read the same way."""
        size = {"shortest_edge": self.shortest_edge} if self.shortest_edge is not None else (
            {"height": self.resize_to[0], "width": self.resize_to[1]} if self.resize_to else {})
        config: dict[str, Any] = {
            "do_resize": self.do_resize, "size": size, "resample": self.resample,
            "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
        }
        if self.crop_size is not None:
            config["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return config


def _shortest_edge_size(image: Image.Image, shortest: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): (height, width)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop on [C, H, W]: offsets (H - h) // 2, zero padding where the image is smaller."""
    crop_height, crop_width = size
    height, width = pixels.shape[1:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_height, left : left + crop_width]
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((pixels.shape[0], padded_height, padded_width), dtype=pixels.dtype)
    pad_top, pad_left = -(-(padded_height - height) // 2), -(-(padded_width - width) // 2)  # ceil
    padded[:, pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(padded_height, top + crop_height), max(0, left) : min(padded_width, left + crop_width)]
