"""Denoising loss on fixed noise and timesteps: compares UNets (base vs. LoRA) on the same data,
independent of any training random stream."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from naruto_lora.train.conditioning import Conditioning
from naruto_lora.train.objective import per_sample_mse, prediction_target

EVAL_TIMESTEPS = (50, 200, 350, 500, 650, 800, 950)


@torch.no_grad()
def denoising_loss(
    unet: Any,
    conditionings: Iterable[Conditioning],
    noise_scheduler: Any,
    *,
    seed: int = 1234,
    timesteps: Sequence[int] = EVAL_TIMESTEPS,
) -> float:
    """Mean prediction error over every batch at every one of ``timesteps``, the noise drawn in
    a fixed order from a generator seeded by ``seed``: two UNets evaluated with the same
    arguments see exactly the same noisy inputs."""
    losses = []
    generator = torch.Generator().manual_seed(seed)
    for cond in conditionings:
        latents = cond.latents.float().cpu()
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((latents.shape[0],), int(t), dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents, noise, steps)
            device, dtype = unet.device, unet.dtype
            prediction = unet(
                noisy.to(device, dtype),
                steps.to(device),
                encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
                added_cond_kwargs={
                    "text_embeds": cond.pooled_embeds.to(device, dtype),
                    "time_ids": cond.time_ids.to(device, dtype),
                },
                return_dict=False,
            )[0]
            target = prediction_target(noise_scheduler, latents, noise, steps)
            losses.append(per_sample_mse(prediction.cpu(), target))
    return float(torch.cat(losses).mean())
