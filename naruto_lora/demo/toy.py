"""The CPU style-transfer demo's data: generated "plain" scenes and the same scenes in a style.

A scene is one flat shape (circle, square or triangle) of one colour, small or big, on the left,
in the center or on the right, with a caption that says so ("a big blue square on the left").

- ``plain``: a cream background and a flat shape. The committed toy base model
  (``nlora:toy-base``, see ``naruto_lora/demo/assets/toy-base/README.md``) was trained on these.
- ``style``: the same scenes in a strong orange-and-black manner (a nod to the Naruto target): an
  orange background and a thick black outline around the shape. The shape keeps its colour, so
  the caption's content stays checkable (``naruto_lora.demo.style.content_check``).

``nlora:toy-style`` is the style set in the ``imagefolder`` layout (PNGs plus ``metadata.jsonl``
with ``file_name`` and ``text``), created deterministically on first use in the user cache. It
leaves out the scenes of ``HELD_OUT``, whose prompts (``HELD_OUT_PROMPTS``) the demo and its test
sample, so that a LoRA must carry the style to scenes it never saw.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from naruto_lora.demo.tiny import is_ready, paint_shape
from naruto_lora.util.home import nlora_home

TOY_BASE_ID = "nlora:toy-base"
TOY_STYLE_ID = "nlora:toy-style"
TOY_PLAIN_ID = "nlora:toy-plain"
TOY_DATA_VERSION = "1"
RESOLUTION = 64

# No orange, black or white shapes: those are the style's own colours (and the background).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 70),
    "blue": (40, 80, 215),
    "yellow": (250, 230, 60),
    "purple": (135, 55, 185),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "center", "right")
SIZES = ("small", "big")
PLAIN_BACKGROUND = (235, 232, 222)
STYLE_BACKGROUND = (245, 135, 20)
STYLE_INK = (15, 10, 10)

# Radius in units of the image side, and the centre's x for each position.
_RADIUS = {"small": 0.16, "big": 0.24}
_CENTRE_X = {"left": 0.27, "center": 0.5, "right": 0.73}
_SUPERSAMPLE = 4  # draw 4x larger and downsample: smooth edges, like a rendered picture

# (colour, shape, position) triples absent from the style set, in both sizes.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("blue", "square", "left"),
    ("red", "circle", "right"),
    ("yellow", "triangle", "center"),
    ("green", "circle", "left"),
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


HELD_OUT_PROMPTS: tuple[str, ...] = tuple(
    Scene(shape, colour, position, size).caption
    for (colour, shape, position), size in zip(
        HELD_OUT, ("big", "big", "big", "small"), strict=False
    )
)

_CAPTION = re.compile(
    r"\b(?P<size>small|big)?\s*(?P<colour>"
    + "|".join(COLOURS)
    + r")\s+(?P<shape>"
    + "|".join(SHAPES)
    + r")\b.*?\b(?P<position>left|center|right)\b"
)


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; ``ValueError`` if it is not one of ours."""
    match = _CAPTION.search(caption.lower())
    if not match:
        raise ValueError(f"not a toy scene caption: {caption!r}")
    return Scene(match["shape"], match["colour"], match["position"], match["size"] or "big")


def all_scenes() -> list[Scene]:
    return [
        Scene(shape, colour, position, size)
        for shape in SHAPES
        for colour in COLOURS
        for position in POSITIONS
        for size in SIZES
    ]


def is_held_out(scene: Scene) -> bool:
    return (scene.colour, scene.shape, scene.position) in HELD_OUT


def draw(
    scene: Scene,
    styled: bool = False,
    size: int = RESOLUTION,
    jitter: random.Random | None = None,
    palette: dict | None = None,
):
    """One scene as a PIL image; ``jitter`` moves and resizes the shape a little.

    ``palette`` overrides the look (keys ``background``, ``fill``, ``outline``, ``width`` as a
    fraction of the side): the base's VAE learns from arbitrary looks, not just the plain one.
    """
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    dx = dy = dr = 0.0
    if jitter is not None:
        dx, dy, dr = (
            jitter.uniform(-0.05, 0.05),
            jitter.uniform(-0.05, 0.05),
            jitter.uniform(-0.02, 0.02),
        )
    cx, cy = (_CENTRE_X[scene.position] + dx) * big, (0.5 + dy) * big
    r = (_RADIUS[scene.size] + dr) * big
    look = {"background": PLAIN_BACKGROUND, "fill": COLOURS[scene.colour]}
    if styled:
        # The style: an orange background, thick black ink (1/20 of the side: 3 px at 64 px).
        look.update(background=STYLE_BACKGROUND, outline=STYLE_INK, width=1 / 20)
    look.update(palette or {})
    image = Image.new("RGB", (big, big), tuple(look["background"]))
    pen = ImageDraw.Draw(image)
    ink = {}
    if look.get("outline") is not None and look.get("width", 0) > 0:
        ink = {"outline": tuple(look["outline"]), "width": max(1, round(big * look["width"]))}
    # A square of the same "radius" looks bigger than the circle, a triangle smaller.
    r *= {"circle": 1.0, "square": 0.9, "triangle": 1.15}[scene.shape]
    paint_shape(pen, scene.shape, cx, cy, r, tuple(look["fill"]), ink, base=0.8)
    return image.resize((size, size), Image.Resampling.BOX)


# Strong flat colours a random look picks from half of the time (the other half: any colour).
_STRONG = (
    (245, 135, 20),
    (20, 20, 20),
    (240, 240, 240),
    (30, 120, 200),
    (200, 30, 60),
    (250, 220, 40),
    (40, 160, 90),
    (120, 60, 170),
    (150, 150, 150),
    (240, 170, 200),
)


def random_look_scenes(count: int, seed: int = 0) -> list:
    """Scenes in random looks (background, fill and outline colours from a list of strong flat
    colours or anything, outline width 0..1/12): what the toy base's VAE learns to reconstruct
    besides the plain scenes, so that it can encode looks beyond the plain one, as SDXL's VAE can.
    """
    rng = random.Random(seed)
    scenes = all_scenes()

    def colour() -> tuple[int, int, int]:
        if rng.random() < 0.5:
            return rng.choice(_STRONG)
        return tuple(rng.randrange(256) for _ in range(3))

    images = []
    for _ in range(count):
        look = {
            "background": colour(),
            "fill": colour(),
            "outline": colour(),
            "width": rng.choice([0.0, rng.uniform(0.015, 0.085)]),
        }
        images.append(draw(rng.choice(scenes), jitter=rng, palette=look))
    return images


def plain_scenes(per_scene: int, seed: int = 0) -> list[tuple[Scene, object]]:
    """``per_scene`` jittered plain drawings of every scene, in a fixed order (base training)."""
    rng = random.Random(seed)
    return [(scene, draw(scene, jitter=rng)) for _ in range(per_scene) for scene in all_scenes()]


def write_toy_dataset(folder: Path, styled: bool, per_scene: int = 1, seed: int = 0) -> Path:
    """An imagefolder data set: the style set leaves out ``HELD_OUT``; the plain set has all."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    scenes = [s for s in all_scenes() if not (styled and is_held_out(s))]
    for i, scene in enumerate(scene for _ in range(per_scene) for scene in scenes):
        name = f"{i:04d}.png"
        draw(scene, styled=styled, jitter=rng).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": scene.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def toy_dataset_dir(styled: bool = True, root: Path | None = None) -> Path:
    name = "toy-style" if styled else "toy-plain"
    return (root or nlora_home()) / f"{name}-v{TOY_DATA_VERSION}"


def ensure_toy_dataset(styled: bool = True, root: Path | None = None) -> Path:
    """Create the style (or plain) data set once, atomically, in the cache; return its folder."""
    from naruto_lora.util.io import atomic_dir

    folder = toy_dataset_dir(styled, root)
    if is_ready(folder, TOY_DATA_VERSION):
        return folder
    with atomic_dir(folder) as tmp:
        write_toy_dataset(tmp, styled=styled)
        (tmp / ".nlora-complete").write_text(TOY_DATA_VERSION)
    return folder


def toy_base_dir() -> Path:
    """The committed toy base model, shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "toy-base"


def resolve_toy_model() -> str:
    """The local folder of ``nlora:toy-base`` (package data)."""
    from naruto_lora.util.errors import UserError

    folder = toy_base_dir()
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"The toy base model is missing from this installation (looked in '{folder}').",
            hint="Reinstall naruto-lora (the wheel ships it as package data), or rebuild it with "
            "`python scripts/train_base.py`.",
        )
    return str(folder)


def _any_colour(rng: random.Random) -> tuple[int, int, int]:
    """A strong flat colour half of the time, any colour the other half."""
    if rng.random() < 0.5:
        return rng.choice(_STRONG)
    return tuple(rng.randrange(256) for _ in range(3))


def random_drawing(rng: random.Random, size: int = RESOLUTION):
    """A flat drawing from a broad procedural distribution: what the toy VAE learns to reconstruct.

    A background of any colour (a third of the time a two-colour gradient or stripes: some
    texture), then 1-3 shapes (disc, ellipse, square, rectangle, triangle) of any colour and size,
    anywhere, each with an outline of any colour and thickness (or none). The plain and style sets
    are two narrow corners of this distribution, so the VAE never needs to see either.
    """
    from PIL import Image, ImageDraw

    big = size * _SUPERSAMPLE
    background = _any_colour(rng)
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    texture = rng.random()
    if texture < 0.2:  # a vertical or horizontal gradient
        other = _any_colour(rng)
        horizontal = rng.random() < 0.5
        for i in range(0, big, _SUPERSAMPLE):
            t = i / big
            colour = tuple(round(a + (b - a) * t) for a, b in zip(background, other, strict=True))
            box = (i, 0, i + _SUPERSAMPLE, big) if horizontal else (0, i, big, i + _SUPERSAMPLE)
            pen.rectangle(box, fill=colour)
    elif texture < 0.33:  # stripes
        other = _any_colour(rng)
        period = rng.randrange(8, 24) * _SUPERSAMPLE
        for i in range(0, big, period):
            pen.rectangle((i, 0, i + period // 2, big), fill=other)
    for _ in range(rng.choice((1, 1, 2, 2, 3))):
        r = rng.uniform(0.08, 0.3) * big
        cx, cy = rng.uniform(0.1, 0.9) * big, rng.uniform(0.1, 0.9) * big
        aspect = rng.uniform(0.6, 1.4)
        fill = _any_colour(rng)
        ink = {}
        if rng.random() < 0.7:
            ink = {
                "outline": _any_colour(rng),
                "width": max(1, round(big * rng.uniform(0.01, 0.085))),
            }
        box = (cx - r, cy - r * aspect, cx + r, cy + r * aspect)
        kind = rng.choice(("circle", "square", "triangle"))
        if kind == "circle":
            pen.ellipse(box, fill=fill, **ink)
        elif kind == "square":
            pen.rectangle(box, fill=fill, **ink)
        else:
            pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill, **ink)
    return image.resize((size, size), Image.Resampling.BOX)


# Random drawings no training run uses: the VAE's held-out gate set (tests/test_toy_vae.py).
HELD_OUT_DRAWINGS_SEED = 1_000_003


def random_drawings(count: int, seed: int = 0, size: int = RESOLUTION) -> list:
    rng = random.Random(seed)
    return [random_drawing(rng, size) for _ in range(count)]
