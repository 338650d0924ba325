"""What a batch becomes before the UNet sees it: latents, text conditioning, SDXL time ids.

Latents come from the latent cache (already scaled) or, with ``cache.latents = false``, from the
VAE on the fly. Text comes from the disk cache (``cache.text = "disk"``: the encoders are never
loaded) or from both CLIP encoders on the device, frozen (``"memory"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from naruto_lora.models.loading import TextEncoders, encode_prompts
from naruto_lora.train.objective import batch_time_ids


@dataclass
class Conditioning:
    latents: torch.Tensor  # fp32, scaled to the UNet's latent space
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor


@dataclass
class Conditioner:
    device: torch.device
    weight_dtype: torch.dtype
    text_encoders: TextEncoders | None = None
    vae: Any = None
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    generator: torch.Generator | None = None

    def __call__(self, batch: dict[str, Any]) -> Conditioning:
        prompt_embeds, pooled_embeds = self.text(batch)
        return Conditioning(
            latents=self.latents(batch),
            prompt_embeds=prompt_embeds.to(self.device, self.weight_dtype),
            pooled_embeds=pooled_embeds.to(self.device, self.weight_dtype),
            time_ids=batch_time_ids(batch["time_ids"], self.device, self.weight_dtype),
        )

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        return self.encode_pixels(batch["pixel_values"])

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE-encode images in [-1, 1]; sample the posterior with the run's generator so the
        draw is part of the resumable state."""
        pixels = pixel_values.to(self.device, self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=self.generator).float()
        return (latents - self.shift_factor) * self.scaling_factor

    def text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"], batch["pooled_embeds"]
        if self.text_encoders is None:
            raise RuntimeError("batch has no cached text embeddings and no encoders are loaded")
        return encode_prompts(self.text_encoders, list(batch["caption"]), self.device)
