"""Min-SNR loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", arXiv 2303.09556).

With SNR(t) = alpha_bar_t / (1 - alpha_bar_t) from the scheduler's ``alphas_cumprod``, the
per-sample weight of the MSE loss is

* epsilon prediction: min(SNR, gamma) / SNR   (= min(1, gamma / SNR))
* v-prediction:       min(SNR, gamma) / (SNR + 1)

The epsilon form is written as min(1, gamma / SNR), its limit as SNR -> 0, so schedules with zero
terminal SNR give weight 1 rather than 0/0. (The reference document's example table and its
v-prediction snippet disagree with the paper; this follows the paper.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.train.objective import TimestepWeightTable
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class MinSNRConfig:
    gamma: float = 5.0

    def validate(self) -> None:
        if not self.gamma > 0:
            raise UserError(
                f"plugins.min_snr.gamma = {self.gamma!r} must be positive (the paper uses 5)."
            )


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights for the given prediction type (finite for SNR in [0, inf])."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        # min(SNR, g) / SNR rewritten so SNR = 0 gives its limit, 1, and SNR = inf gives 0.
        return torch.where(
            snr > 0, clipped / torch.where(snr > 0, snr, torch.ones_like(snr)), torch.ones_like(snr)
        )
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise UserError(
        f"min_snr does not support prediction_type '{prediction_type}'; it supports 'epsilon' and 'v_prediction'.",
        hint="Disable it with --disable min_snr.",
    )


class MinSNR(Plugin):
    name = "min_snr"
    Config = MinSNRConfig
    description = "Min-SNR-gamma loss weighting (Hang et al. 2023): faster, steadier convergence."

    def __init__(self, config: MinSNRConfig):
        super().__init__(config)
        self._weights = TimestepWeightTable(
            lambda snr, scheduler: min_snr_weights(
                snr, self.config.gamma, scheduler.config.prediction_type
            )
        )

    @hookimpl
    def nlora_loss_weights(self, state, timesteps: torch.Tensor) -> torch.Tensor:
        return self._weights(state.noise_scheduler, timesteps)


PLUGIN = MinSNR
