"""``nlora sample``: images from the base model with the trained LoRA, or comparison grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from naruto_lora.cli.common import profile_options
from naruto_lora.cli.lora_source import lora_options, resolve_lora_source
from naruto_lora.config.profile import BASE_WEIGHTS
from naruto_lora.sample.pipeline import DEFAULT_SCALES, SCHEDULER_NAMES


def quiet_loading() -> None:
    """diffusers and transformers draw a bar per component loaded; ours covers the sampling."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@click.command("sample")
@lora_options
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="LoRA strength fused into the UNet (0 = the base model).",
)
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt. Repeatable.")
@click.option(
    "--prompts",
    "prompts_file",
    default=None,
    metavar="FILE",
    help="A text file with one prompt per line (# comments skipped).",
)
@click.option("--negative-prompt", default=None, help="What to steer away from.")
@click.option("--steps", type=int, default=50, show_default=True, help="Denoising steps.")
@click.option(
    "--guidance",
    type=float,
    default=7.5,
    show_default=True,
    help="Classifier-free guidance scale.",
)
@click.option(
    "--height",
    type=int,
    default=None,
    help="Pixels (default: the model's size, 1024 for SDXL).",
)
@click.option("--width", type=int, default=None, help="Pixels (default: the model's size).")
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the first image; image N of a prompt uses seed+N. "
    "Default: the profile's validation.seed.",
)
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULER_NAMES),
    default="default",
    show_default=True,
    help="Sampler; 'default' is the model's own.",
)
@click.option(
    "--out",
    default=None,
    metavar="PATH",
    help="A .png file (one image) or a folder. Default: 'samples' beside the LoRA.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="One labelled grid per prompt: the base model beside the LoRA at --scales.",
)
@click.option(
    "--scales",
    default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
    show_default=True,
    help="LoRA scales for --compare (0 = the base model).",
)
@click.option(
    "--low-vram",
    is_flag=True,
    help="Attention slicing, VAE slicing and tiling, sequential CPU offload "
    "(SDXL in ~5-6 GB of GPU memory, slower).",
)
@click.option(
    "--dtype",
    "dtype_name",
    type=click.Choice(["auto", "fp16", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="auto: fp16 on a GPU, fp32 on the CPU.",
)
@click.option(
    "--base-weights",
    type=click.Choice(BASE_WEIGHTS),
    default=None,
    help="Store the base UNet and text encoders in 8 bits (the LoRA stays attached in full "
    "precision). Default: the profile's model.base_weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace images already at the output paths.")
@profile_options
@click.pass_context
def sample_cmd(
    ctx: click.Context,
    scale: float,
    prompts: tuple[str, ...],
    prompts_file: str | None,
    negative_prompt: str | None,
    steps: int,
    guidance: float,
    height: int | None,
    width: int | None,
    seed: int | None,
    num_images: int,
    scheduler: str,
    out: str | None,
    compare: bool,
    scales: str,
    low_vram: bool,
    dtype_name: str,
    overwrite: bool,
    base_weights: str | None,
    **kwargs: Any,
) -> None:
    """Generate images with a trained LoRA.

    \b
    nlora sample --lora output/naruto --prompt "a ninja boy, naruto style"
    nlora sample --lora output/naruto --ema --compare --prompts prompts.txt
    """
    from naruto_lora.sample.pipeline import SampleOptions, parse_scales, read_prompts, sample
    from naruto_lora.util.console import console

    lora_file, profile, _ = resolve_lora_source(ctx, kwargs)
    options = SampleOptions(
        prompts=read_prompts(prompts, prompts_file) or tuple(profile.validation.prompts),
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        seed=profile.validation.seed if seed is None else seed,
        num_images=num_images,
        scheduler=scheduler,
    )
    quiet_loading()
    paths = sample(
        lora_file=lora_file,
        model_cfg=profile.model,
        profile=profile,
        options=options,
        out=Path(out) if out else lora_file.parent / "samples",
        scale=scale,
        compare=compare,
        scales=parse_scales(scales),
        low_vram=low_vram,
        dtype_name=dtype_name,
        overwrite=overwrite,
        base_weights=base_weights,
    )
    what = "grid" if compare else "image"
    console.print(f"[green]Wrote {len(paths)} {what}{'s' if len(paths) != 1 else ''}:[/]")
    for path in paths:
        console.print(f"  {path}", soft_wrap=True)
