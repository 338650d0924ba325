"""How much an image shows the toy demo's style, and whether it still shows its caption's content.

The style of ``nlora:toy-style`` (see ``naruto_lora.demo.toy``) is an orange background and thick black
outlines. ``style_score`` measures it as a *palette share*: the fraction of pixels whose colour is
close to one of the style's two colours, orange (``toy.STYLE_BACKGROUND``) or black ink
(``toy.STYLE_INK``). Plain scenes (cream background, flat coloured shape) score near 0; styled
scenes score about 0.8 (the coloured shape itself is in neither palette colour).

``content_check`` tests that the caption's shape is still there: enough pixels of the caption's
colour, and the shape: of a square, a disc and an upright triangle drawn in the region's
bounding box, the one that overlaps the region best. Whether the region's centre is on the
caption's side is measured too (``position_ok``) but not required to pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from naruto_lora.demo import toy

# Euclidean distance in 0..255 RGB under which a pixel counts as "that colour". The toy palette's
# colours are at least 90 apart from each other and from the backgrounds.
PALETTE_TOLERANCE = 60.0
COLOUR_TOLERANCE = 70.0
MIN_COLOUR_SHARE = 0.004  # 16 px at 64 px; the smallest styled triangle shows about 1 %
# A drawn shape fills at least ~0.45 of its box (a triangle); scattered pixels fill much less.
MIN_FILL = 0.3
_POSITION_X = {"left": (0.0, 0.42), "center": (0.36, 0.64), "right": (0.58, 1.0)}


def _rgb(image) -> np.ndarray:
    """An (H, W, 3) float array from a PIL image or an array in 0..255."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return array.astype(np.float32)[..., :3]


def _near(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: float) -> np.ndarray:
    return np.linalg.norm(rgb - np.asarray(colour, dtype=np.float32), axis=-1) < tolerance


def style_components(image) -> dict[str, float]:
    """The shares of style-orange pixels and of black-ink pixels."""
    rgb = _rgb(image)
    return {
        "orange_share": float(_near(rgb, toy.STYLE_BACKGROUND, PALETTE_TOLERANCE).mean()),
        "ink_share": float(_near(rgb, toy.STYLE_INK, PALETTE_TOLERANCE).mean()),
    }


def style_score(image) -> float:
    """The style's palette share, in [0, 1]: orange pixels plus black-ink pixels, over all pixels."""
    parts = style_components(image)
    return parts["orange_share"] + parts["ink_share"]


@dataclass(frozen=True)
class ContentResult:
    colour_share: float
    centre_x: float  # the colour region's centre, 0 (left edge) .. 1 (right edge)
    fill_ratio: float
    shape: str  # the shape the fill ratio says
    colour_ok: bool
    position_ok: bool
    shape_ok: bool

    @property
    def passed(self) -> bool:
        """The caption's shape in the caption's colour is there (where it is, ``position_ok``,
        is reported but not required: the toy base places shapes unreliably)."""
        return self.colour_ok and self.shape_ok

    def summary(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        side = "side ok" if self.position_ok else "side wrong"
        return (
            f"{verdict} (colour {self.colour_share:.3f}, x {self.centre_x:.2f} {side}, "
            f"fill {self.fill_ratio:.2f} -> {self.shape})"
        )


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """The three shapes drawn to fill a ``height`` x ``width`` box, as toy.draw draws them."""
    y = (np.arange(height)[:, None] + 0.5) / height  # 0..1 from the top
    x = (np.arange(width)[None, :] + 0.5) / width
    return {
        "square": np.ones((height, width), dtype=bool),
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(x - 0.5) <= 0.5 * y,  # apex at the top centre, base at the bottom
    }


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template overlaps the region best (intersection over union), and how much
    of its bounding box the region fills. The box spans the 1st..99th percentile of the region's
    pixels, so a few stray pixels of the same colour elsewhere do not stretch it."""
    ys, xs = np.nonzero(mask)
    y0, y1 = (int(round(v)) for v in np.percentile(ys, [1, 99]))
    x0, x1 = (int(round(v)) for v in np.percentile(xs, [1, 99]))
    region = mask[y0 : y1 + 1, x0 : x1 + 1]
    fill = float(region.mean())
    ious = {
        name: (region & t).sum() / max((region | t).sum(), 1)
        for name, t in _templates(*region.shape).items()
    }
    return max(ious, key=ious.get), fill


def content_check(image, caption: str) -> ContentResult:
    """Whether ``image`` shows the scene ``caption`` describes (its colour, side and shape)."""
    scene = toy.parse_caption(caption)
    mask = _near(_rgb(image), toy.COLOURS[scene.colour], COLOUR_TOLERANCE)
    share = float(mask.mean())
    if share * mask.size < 4:  # nothing of that colour to measure
        return ContentResult(share, float("nan"), 0.0, "none", False, False, False)
    centre_x = float((np.nonzero(mask)[1].mean() + 0.5) / mask.shape[1])
    shape, fill = _classify_shape(mask)
    lo, hi = _POSITION_X[scene.position]
    return ContentResult(
        share,
        centre_x,
        fill,
        shape,
        colour_ok=share >= MIN_COLOUR_SHARE,
        position_ok=lo <= centre_x <= hi,
        shape_ok=shape == scene.shape and fill >= MIN_FILL,
    )


@dataclass(frozen=True)
class PromptScore:
    prompt: str
    scale: float  # LoRA scale; 0 is the base model
    style: float
    content: ContentResult


def score_samples(
    pipe,
    prompts: list[str],
    scales: tuple[float, ...] = (0.0, 1.0),
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
) -> list[PromptScore]:
    """Sample each prompt at each LoRA scale (same seed for all) and score the images.

    ``pipe`` is a ``StableDiffusionXLPipeline``; with a LoRA loaded (``load_lora_weights``),
    scale 0 gives the base model's images and 1 the LoRA's.
    """
    import torch

    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    scores = []
    for scale in scales:
        images = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            cross_attention_kwargs={"scale": scale},
            generator=torch.Generator().manual_seed(seed),
        ).images
        scores += [
            PromptScore(p, scale, style_score(im), content_check(im, p))
            for p, im in zip(prompts, images, strict=False)
        ]
    return scores
