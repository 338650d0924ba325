"""Images and their preprocessing: decoding and colour conversion, aspect-ratio buckets, crop
plans, the pixel tensor the VAE sees, and SDXL's time ids.

A crop plan is computed from the image size alone (:class:`CropPlan`), so fingerprints and time
ids are known before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Bucket sides are multiples of 64 (the rule; also a multiple of every VAE factor in use).
BUCKET_STEP = 64
MAX_BUCKET_RATIO = 4.0
# LANCZOS keeps downscaled line art (the Naruto target) sharp; part of the latent fingerprint.
RESAMPLE = "lanczos"


# --------------------------------------------------------------------------- images


class ImageError(Exception):
    """An image that cannot be used (unreadable, truncated, too small); the item is skipped."""


def image_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _open(data: bytes):
    from PIL import Image

    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, DecompressionBombError, ...
        raise ImageError(f"not a readable image ({type(exc).__name__}: {exc})") from exc


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) as displayed, i.e. after the EXIF orientation; reads the header only."""
    image = _open(data)
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the pixels may still be fine
        orientation = 1
    width, height = image.size
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_rgb(data: bytes):
    """Decode fully (truncation shows here), apply EXIF orientation, convert to 8-bit RGB.

    Alpha is composited on white (transparent areas of drawings are meant as paper, and
    dropping alpha would expose whatever colour the transparent pixels hold); greyscale, CMYK,
    palette and 16-bit images are converted rather than refused.
    """
    from PIL import Image, ImageOps

    image = _open(data)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ImageError(f"cannot decode ({type(exc).__name__}: {exc})") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------- buckets and crops


def _fitting_sides(long_limit: int, short_side: int, area: int, step: int) -> int:
    """The largest multiple of ``step`` for the other side of a bucket whose one side is
    ``short_side``: within the area, the image (``long_limit``) and the aspect-ratio cap."""
    by_area = area // short_side // step * step
    by_ratio = int(short_side * MAX_BUCKET_RATIO) // step * step
    return min(by_area, long_limit // step * step, by_ratio)


def bucket_for(
    height: int, width: int, resolution: int, step: int = BUCKET_STEP
) -> tuple[int, int] | None:
    """The (h, w) bucket for an image: sides multiples of ``step``, area at most
    ``resolution**2`` and never more than the image's own (no upscaling), aspect ratio as close
    to the image's as possible (ties: the larger area) within 1:4 .. 4:1 (SDXL's bucket range;
    more extreme images are cropped to it). None if a side is below ``step``.

    Candidates fix one side and give the other the most the area allows, from both sides, so a
    transposed image gets the transposed bucket.
    """
    area = min(resolution * resolution, height * width)
    candidates = [(_fitting_sides(height, w, area, step), w) for w in range(step, width + 1, step)]
    candidates += [(h, _fitting_sides(width, h, area, step)) for h in range(step, height + 1, step)]
    target = math.log(width / height)
    best: tuple[float, int, tuple[int, int]] | None = None
    for bucket_h, bucket_w in candidates:
        if min(bucket_h, bucket_w) < step or max(bucket_h, bucket_w) > MAX_BUCKET_RATIO * min(
            bucket_h, bucket_w
        ):
            continue
        error = round(abs(math.log(bucket_w / bucket_h) - target), 9)
        candidate = (error, -bucket_w * bucket_h, (bucket_h, bucket_w))
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]


@dataclass(frozen=True)
class CropPlan:
    """How one item becomes a training image: resize to ``resized_size`` (h, w), crop the
    ``target_size`` box at ``crop_box_top_left`` (top, left), then mirror if ``flip``."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL's crop coordinate: the crop's top-left in the (mirrored, if flipped) resized
        image, as diffusers' SDXL script computes it when it flips before cropping."""
        top, left = self.crop_box_top_left
        if self.flip:
            left = self.resized_size[1] - left - self.target_size[1]
        return top, left

    def fields(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "resized_size": list(self.resized_size),
            "crop_box_top_left": list(self.crop_box_top_left),
            "target_size": list(self.target_size),
            "flip": self.flip,
        }


def plan_crop(
    original_size: tuple[int, int], data_cfg: Any, *, seed: int, key: str, flip: bool = False
) -> CropPlan:
    """Resize the short side so the target box is covered, then center- or random-crop.

    The random crop is drawn from (seed, item key), so the cache is reproducible and a seed
    change is a fingerprint change. Raises ImageError when no bucket fits.
    """
    height, width = original_size
    if data_cfg.buckets:
        bucket = bucket_for(height, width, data_cfg.resolution)
        if bucket is None:
            raise ImageError(f"{width}x{height} px is too small for a {BUCKET_STEP} px bucket")
        target = bucket
    else:
        target = (data_cfg.resolution, data_cfg.resolution)
    scale = max(target[0] / height, target[1] / width)
    resized = (max(target[0], round(height * scale)), max(target[1], round(width * scale)))
    spare_h, spare_w = resized[0] - target[0], resized[1] - target[1]
    if data_cfg.center_crop:
        box = (spare_h // 2, spare_w // 2)
    else:
        rng = random.Random(f"{seed}:{key}")
        box = (rng.randint(0, spare_h), rng.randint(0, spare_w))
    return CropPlan(original_size, resized, box, target, flip)


def preprocess(image: Any, plan: CropPlan) -> torch.Tensor:
    """PIL RGB image -> float32 tensor [3, h, w] in [-1, 1], as the VAE expects."""
    from PIL import Image

    resample = Image.Resampling.LANCZOS
    if (image.height, image.width) != plan.original_size:
        raise ImageError(
            f"decoded size {image.height}x{image.width} differs from the planned "
            f"{plan.original_size[0]}x{plan.original_size[1]}"
        )
    resized = image.resize((plan.resized_size[1], plan.resized_size[0]), resample)
    top, left = plan.crop_box_top_left
    cropped = resized.crop((left, top, left + plan.target_size[1], top + plan.target_size[0]))
    if plan.flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


TIME_ID_FIELDS = ("orig_h", "orig_w", "crop_top", "crop_left", "target_h", "target_w")


def time_ids(
    original_size: Iterable[int], crop_top_left: Iterable[int], target_size: Iterable[int]
) -> torch.Tensor:
    """SDXL's micro-conditioning for one item: (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w) as float32, the order of ``StableDiffusionXLPipeline._get_add_time_ids``.
    Training must feed each item's real values, not constants (SDXL paper, section 2.2)."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != len(TIME_ID_FIELDS):
        raise ValueError(f"time ids need 2 + 2 + 2 values, got {values}")
    return torch.tensor(values, dtype=torch.float32)
