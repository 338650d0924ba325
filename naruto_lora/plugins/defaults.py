"""The core's own answers to the "exactly one answer" hooks, registered ``trylast`` so any
plugin's answer wins."""

from __future__ import annotations

import torch

from naruto_lora.plugins.hookspecs import hookimpl


class CoreDefaults:
    @hookimpl(trylast=True)
    def nlora_sample_noise(self, state, latents: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )

    @hookimpl(trylast=True)
    def nlora_sample_timesteps(self, state, batch_size: int, device, generator) -> torch.Tensor:
        num = state.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, num, (batch_size,), generator=generator, device=device).long()
