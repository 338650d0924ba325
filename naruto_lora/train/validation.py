"""Validation samples: the profile's prompts, a fixed seed, one labelled grid per step in
``samples/`` (the grid maker ``nlora sample`` uses).

The prompts are encoded once at setup, so a run with the text cache on disk needs the text
encoders only for that moment (on the CPU), not for the whole run. Sampling runs inside
``nlora_validation_weights`` so wrapper plugins (EMA) swap their weights in around it, and inside
``torch.random.fork_rng`` so drawing samples never shifts the training's random streams (exact
resume relies on that).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naruto_lora.models.loading import TextEncoders, encode_prompts, load_text_encoders
from naruto_lora.sample.grid import make_grid


@dataclass
class Validation:
    prompts: tuple[str, ...]
    prompt_embeds: torch.Tensor  # [prompts, tokens, dim], CPU fp32
    pooled_embeds: torch.Tensor  # [prompts, dim]
    vae: Any
    resolution: int
    seed: int
    num_inference_steps: int
    guidance_scale: float


def encode_validation_prompts(
    profile: Any, text_encoders: TextEncoders | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the prompts with the run's encoders, or load them on the CPU just for this."""
    prompts = list(profile.validation.prompts)
    if text_encoders is not None:
        embeds, pooled = encode_prompts(text_encoders, prompts, device)
    else:
        encoders = load_text_encoders(profile.model, torch.float32)
        embeds, pooled = encode_prompts(encoders, prompts, "cpu")
        del encoders
    return embeds.float().cpu(), pooled.float().cpu()


def _pipeline(validation: Validation, unet: Any, noise_scheduler: Any) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=validation.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_latents(vae: Any, latents: torch.Tensor, image_processor: Any) -> list[Any]:
    """The pipeline's own decode, done here in the VAE's dtype and outside autocast, so a VAE
    kept in fp32 (not fp16-safe) really decodes in fp32."""
    config = vae.config
    latents = latents.to(vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None):
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return image_processor.postprocess(image.float(), output_type="pil")


def generate_images(
    validation: Validation,
    unet: Any,
    noise_scheduler: Any,
    device: torch.device,
    weight_dtype: torch.dtype,
    autocast: Callable[[], AbstractContextManager],
) -> list[Any]:
    """One image per prompt, each from the same fixed seed so grids compare across steps."""
    pipe = _pipeline(validation, unet, noise_scheduler)
    images = []
    for i in range(len(validation.prompts)):
        generator = torch.Generator(device=device).manual_seed(validation.seed)
        with autocast():
            latents = pipe(
                prompt_embeds=validation.prompt_embeds[i : i + 1].to(device, weight_dtype),
                pooled_prompt_embeds=validation.pooled_embeds[i : i + 1].to(device, weight_dtype),
                height=validation.resolution,
                width=validation.resolution,
                num_inference_steps=validation.num_inference_steps,
                guidance_scale=validation.guidance_scale,
                generator=generator,
                output_type="latent",
            ).images
        images += decode_latents(validation.vae, latents, pipe.image_processor)
    return images


def write_samples(run: Any, step: int) -> Path:
    """Render the grid for ``step`` through the ``nlora_validation_weights`` wrappers."""
    from naruto_lora.util.io import atomic_path

    unet = run.state.unet
    path = run.state.output_dir / "samples" / f"step-{step}.png"

    def render(state: Any) -> Path:
        images = generate_images(
            run.validation,
            unet,
            state.noise_scheduler,
            state.device,
            state.weight_dtype,
            run.autocast,
        )
        grid = make_grid(
            [[image] for image in images],
            column_labels=[f"seed {run.validation.seed}"],
            row_labels=list(run.validation.prompts),
            title=f"{run.profile.name}: validation samples after step {step}",
        )
        with atomic_path(path) as tmp:
            grid.image.save(tmp, format="png")
        return path

    devices = [state_device_index(run.state.device)] if run.state.device.type == "cuda" else []
    was_training = unet.training
    unet.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            run.pm.hook.nlora_validation_weights.call_extra([render], {"state": run.state})
    finally:
        unet.train(was_training)
    return path


def state_device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
