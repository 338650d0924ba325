"""Debiased-estimation loss weighting (Yu et al. 2024, "Debias the Training of Diffusion Models",
arXiv 2310.08442; kohya's sd-scripts ``--debiased_estimation_loss``).

With SNR(t) = alpha_bar_t / (1 - alpha_bar_t), each sample's epsilon-MSE is weighted by
1 / sqrt(SNR(t)) (SNR capped at ``max_snr`` so the lowest timesteps keep a finite, small
weight). It shifts the training signal towards the noisy timesteps, where the epsilon objective
gives almost no gradient but where a picture's overall colours and layout are decided: a style
that changes a whole image's palette (a background colour, ink) is learnt there. Combined with
Min-SNR the two weights multiply, as in kohya's trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.train.objective import TimestepWeightTable
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class DebiasedConfig:
    max_snr: float = 1000.0

    def validate(self) -> None:
        if not self.max_snr > 0:
            raise UserError(
                f"plugins.debiased_estimation.max_snr = {self.max_snr!r} must be positive "
                "(kohya's sd-scripts cap SNR at 1000)."
            )


def debiased_weights(snr: torch.Tensor, max_snr: float) -> torch.Tensor:
    """1 / sqrt(min(SNR, max_snr)) per timestep; SNR 0 (a zero-terminal-SNR schedule's last
    step) would be infinite, so it takes the weight of the smallest positive SNR instead."""
    positive = snr[snr > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=snr.dtype)
    return 1.0 / torch.sqrt(torch.clamp(torch.where(snr > 0, snr, floor), max=max_snr))


class DebiasedEstimation(Plugin):
    name = "debiased_estimation"
    Config = DebiasedConfig
    description = (
        "Debiased-estimation loss weights 1/sqrt(SNR) (Yu et al. 2024; kohya's "
        "--debiased_estimation_loss): more signal at the noisy timesteps that set colours."
    )

    def __init__(self, config: DebiasedConfig):
        super().__init__(config)
        self._weights = TimestepWeightTable(
            lambda snr, _scheduler: debiased_weights(snr, self.config.max_snr)
        )

    @hookimpl
    def nlora_loss_weights(self, state, timesteps: torch.Tensor) -> torch.Tensor:
        if state.noise_scheduler.config.prediction_type != "epsilon":
            raise UserError(
                "debiased_estimation weights the epsilon objective; this model predicts "
                f"'{state.noise_scheduler.config.prediction_type}'.",
                hint="Disable it with --disable debiased_estimation.",
            )
        return self._weights(state.noise_scheduler, timesteps)


PLUGIN = DebiasedEstimation
