"""Regenerate the README's comparison image, docs/images/demo-compare.png, from the demo.

Runs what the README's first command runs (``nlora demo``: cache, train a LoRA on the toy style
set from the toy base, ``nlora sample --compare``) into a scratch folder, then copies the
comparison grid it wrote. With ``--own-grid`` (or when ``nlora sample --compare`` wrote no
grid) the grid is drawn here instead, straight from diffusers: the base and the trained LoRA at
several scales, one row per held-out prompt, with each image's style score underneath.

    OMP_NUM_THREADS=1 python scripts/make_demo_grid.py            # about 5 minutes on a CPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from naruto_lora.demo import style, toy

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "images" / "demo-compare.png"
SCALES = (0.0, 0.5, 1.0)


def run_demo(work: Path, steps: int | None) -> int:
    """``nlora demo --profile tiny`` into ``work``; returns its exit code."""
    from naruto_lora.cli import cli
    from naruto_lora.cli.common import run_guarded

    args = [
        "demo",
        "--profile",
        "tiny",
        "--output",
        str(work / "run"),
        "--cache-dir",
        str(work / "cache"),
    ]
    args += [a for prompt in toy.HELD_OUT_PROMPTS for a in ("--prompt", prompt)]
    if steps:
        args += ["--steps", str(steps)]
    return run_guarded(cli, args)


def own_grid(lora_dir: Path, seed: int = 0, cell: int = 128, guidance: float = 5.0):
    """Base vs LoRA at ``SCALES`` on the held-out prompts, labelled, via diffusers' own loader."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image, ImageDraw

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    prompts = list(toy.HELD_OUT_PROMPTS)
    label_w, label_h = 200, 14
    grid = Image.new(
        "RGB", (label_w + cell * len(SCALES), label_h + (cell + label_h) * len(prompts)), "white"
    )
    pen = ImageDraw.Draw(grid)
    for col, scale in enumerate(SCALES):
        head = "base" if scale == 0 else f"LoRA x{scale:g}"
        pen.text((label_w + col * cell + 4, 2), head, fill="black")
        images = pipe(
            prompts,
            num_inference_steps=25,
            guidance_scale=guidance,
            height=toy.RESOLUTION,
            width=toy.RESOLUTION,
            cross_attention_kwargs={"scale": scale},
            generator=torch.Generator().manual_seed(seed),
        ).images
        for row, (prompt, image) in enumerate(zip(prompts, images, strict=False)):
            y = label_h + row * (cell + label_h)
            grid.paste(
                image.resize((cell, cell), Image.Resampling.NEAREST), (label_w + col * cell, y)
            )
            check = "shape ok" if style.content_check(image, prompt).passed else "shape lost"
            pen.text(
                (label_w + col * cell + 4, y + cell + 1),
                f"style {style.style_score(image):.2f} {check}",
                fill="black",
            )
            if col == 0:
                pen.text((4, y + cell // 2), prompt, fill="black")
    return grid


def stack(paths: list[Path]):
    """``nlora sample --compare`` writes one grid per prompt: one image, one row per prompt."""
    from PIL import Image

    grids = [Image.open(p).convert("RGB") for p in paths]
    out = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for grid in grids:
        out.paste(grid, (0, y))
        y += grid.height
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "nlora-output" / "demo-grid")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (default: profile's)")
    parser.add_argument("--own-grid", action="store_true", help="draw the grid here, not via nlora")
    parser.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="skip the demo: draw the grid (--own-grid) from this trained LoRA folder",
    )
    parser.add_argument("--guidance", type=float, default=5.0, help="for --own-grid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.lora is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        own_grid(args.lora, guidance=args.guidance).save(args.out)
        print(f"wrote {args.out}")
        return 0
    shutil.rmtree(args.work, ignore_errors=True)
    code = run_demo(args.work, args.steps)
    if code != 0:
        print(f"nlora demo failed with exit code {code}", file=sys.stderr)
        return code
    grids = sorted((args.work / "run" / "compare").glob("*.png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if grids and not args.own_grid:
        stack(grids).save(args.out)
    else:
        own_grid(args.work / "run").save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
