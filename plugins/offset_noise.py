"""Offset noise: noise + strength * N(0, 1) of shape (batch, channels, 1, 1).

A per-image, per-channel constant shift lets the model learn to change an image's overall
brightness, which plain N(0, I) noise almost never asks of it (Guttenberg 2023,
"Diffusion with Offset Noise").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class OffsetNoiseConfig:
    strength: float = 0.1

    def validate(self) -> None:
        if not 0 <= self.strength <= 1:
            raise UserError(
                f"plugins.offset_noise.strength = {self.strength!r} must be in [0, 1] (0.1 is usual)."
            )


def offset_noise(
    latents: torch.Tensor, strength: float, generator: torch.Generator | None
) -> torch.Tensor:
    b, c = latents.shape[:2]
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    offset = torch.randn(
        (b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
    )
    return noise + strength * offset


class OffsetNoise(Plugin):
    name = "offset_noise"
    Config = OffsetNoiseConfig
    description = (
        "Adds a per-channel constant to the noise so the model can learn overall brightness."
    )

    @hookimpl
    def nlora_sample_noise(self, state, latents: torch.Tensor, generator) -> torch.Tensor:
        return offset_noise(latents, self.config.strength, generator)


PLUGIN = OffsetNoise
