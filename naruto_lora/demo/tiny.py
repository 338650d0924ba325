"""The built-in tiny default: an SDXL-architecture model at toy scale and a generated data set.

SDXL's weights (about 7 GB) and the Naruto data set need a download. So that the whole pipeline
runs on a fresh CPU machine, ``nlora:tiny`` resolves to a model built from configs with a fixed
seed (two CLIP text encoders, a UNet with ``addition_embed_type="text_time"``, an AutoencoderKL)
saved in the standard diffusers folder layout, and ``nlora:tiny-shapes`` to a deterministic set of
captioned images in the ``imagefolder`` layout. Both are created on first use in the user cache.

The tiny VAE deliberately differs from SDXL's (downscale factor 2, not 8; ``scaling_factor`` 0.5,
not 0.13025) so that no code can get away with SDXL's numbers hard-coded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from naruto_lora.util.home import nlora_home

TINY_MODEL_ID = "nlora:tiny"
TINY_DATA_ID = "nlora:tiny-shapes"
TINY_VERSION = "1"

# Byte-level BPE needs every byte's printable stand-in in the vocabulary (GPT-2's mapping).


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A few whole words so captions tokenize to words rather than letters.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "black",
    "white",
    "purple",
    "pink",
    "circle",
    "square",
    "triangle",
    "star",
    "ninja",
    "boy",
    "girl",
    "hair",
    "spiky",
    "blond",
    "style",
    "naruto",
    "drawing",
    "picture",
    "small",
    "big",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "background",
]


def write_tokenizer(folder: Path) -> int:
    """A real CLIP BPE tokenizer (vocab.json + merges.txt) with a tiny vocabulary; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    known = set(vocab)
    for word in _WORDS:
        # Merge left to right into the whole word, as BPE training would.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    seen: set[str] = set()
    unique_merges = [m for m in merges if not (m in seen or seen.add(m))]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique_merges) + "\n")
    return len(vocab)


def clip_tokenizers(max_length: int = 77):
    """SDXL's two tokenizers over the tiny vocabulary (the second pads with "!", as SDXL's
    OpenCLIP tokenizer does); returns them and the vocabulary size."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(Path(tmp))
        files = (str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, model_max_length=max_length)
        tokenizer_2 = CLIPTokenizer(*files, pad_token="!", model_max_length=max_length)
    return tokenizer, tokenizer_2, vocab_size


def sdxl_euler_scheduler():
    """The sampling scheduler config SDXL ships (Euler, scaled-linear 0.00085-0.012, 1000 steps)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def clip_text_config(
    tokenizer: Any,
    vocab_size: int,
    hidden_size: int,
    projection_dim: int,
    intermediate_size: int | None = None,
    num_hidden_layers: int = 3,
) -> Any:
    """A small CLIP text encoder's config for the demo's tokenizers (the tiny model's and the
    toy base's encoders differ only in width)."""
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    return CLIPTextConfig(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
    )


def build_tiny_pipeline(seed: int = 0):
    """The tiny SDXL pipeline object, random weights from a fixed seed."""

    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2, vocab_size = clip_tokenizers()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, vocab_size, 32, 32))
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(tokenizer, vocab_size, 48, 40, intermediate_size=64)
    )
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 40,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.5,
    )
    scheduler = sdxl_euler_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def is_ready(folder: Path, version: str = TINY_VERSION) -> bool:
    """Whether a generated demo folder is complete and of this version (its marker says so)."""
    marker = folder / ".nlora-complete"
    return marker.is_file() and marker.read_text().strip() == version


def tiny_model_dir(root: Path | None = None) -> Path:
    return (root or nlora_home()) / f"tiny-sdxl-v{TINY_VERSION}"


def tiny_dataset_dir(root: Path | None = None) -> Path:
    return (root or nlora_home()) / f"tiny-shapes-v{TINY_VERSION}"


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Create the tiny model folder once (atomically) and return its path."""
    from naruto_lora.util.io import atomic_dir

    folder = tiny_model_dir(root)
    if is_ready(folder):
        return folder
    with atomic_dir(folder) as tmp:
        build_tiny_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / ".nlora-complete").write_text(TINY_VERSION)
    return folder


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 20),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "center", "right")


def paint_shape(
    pen, shape: str, cx: float, cy: float, r: float, fill, ink: dict, base: float = 1.0
):
    """One shape with PIL's ``ImageDraw``: a circle or square of "radius" ``r`` around
    (cx, cy), or a triangle with its apex ``r`` above the centre and its base ``base * r``
    below; ``ink`` holds PIL's ``outline``/``width`` (empty: no outline). The one drawing
    routine of the demo worlds (the tiny shapes here, the toy scenes in ``toy.draw``)."""
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, **ink)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, **ink)
    else:
        pen.polygon(
            [(cx, cy - r), (cx - r, cy + r * base), (cx + r, cy + r * base)], fill=fill, **ink
        )


def draw_scene(shape: str, colour: str, position: str, size: int = 64, background=(235, 235, 225)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    r = size // 5
    cx = {"left": size // 4, "center": size // 2, "right": 3 * size // 4}[position]
    # PIL's polygon outline is 1 px wide unless told (the tiny set draws it so).
    ink = {"outline": (0, 0, 0), "width": 2 if shape != "triangle" else 1}
    paint_shape(ImageDraw.Draw(image), shape, cx, size // 2, r, COLOURS[colour], ink)
    return image


def write_tiny_dataset(folder: Path, count: int = 36, size: int = 64, seed: int = 0) -> Path:
    """A deterministic imagefolder data set: PNGs plus ``metadata.jsonl`` (file_name, text).

    Sizes vary a little (some wider, some taller) so bucketing and real time ids get exercised.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        position = POSITIONS[rng.randrange(len(POSITIONS))]
        image = draw_scene(shape, colour, position, size=size)
        if i % 4 == 1:
            image = image.resize((size + size // 2, size))  # wider
        elif i % 4 == 3:
            image = image.resize((size, size + size // 4))  # taller
        name = f"{i:04d}.png"
        image.save(folder / name)
        lines.append(
            json.dumps(
                {"file_name": name, "text": f"a {colour} {shape} on the {position}, naruto style"}
            )
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def ensure_tiny_dataset(root: Path | None = None) -> Path:
    from naruto_lora.util.io import atomic_dir

    folder = tiny_dataset_dir(root)
    if is_ready(folder):
        return folder
    with atomic_dir(folder) as tmp:
        write_tiny_dataset(tmp)
        (tmp / ".nlora-complete").write_text(TINY_VERSION)
    return folder
