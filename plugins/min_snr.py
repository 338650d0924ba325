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
from typing import Any

import torch

from naruto_lora.errors import UserError
from naruto_lora.hookspecs import hookimpl
from naruto_lora.plugins import Plugin


@dataclass(frozen=True)
class MinSNRConfig:
    gamma: float = 5.0

    def validate(self) -> None:
        if not self.gamma > 0:
            raise UserError(
                f"plugins.min_snr.gamma = {self.gamma!r} must be positive (the paper uses 5)."
            )


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


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
        self._table: torch.Tensor | None = None
        self._table_of: tuple[int, torch.device] | None = None

    def weight_table(self, scheduler: Any, device: torch.device) -> torch.Tensor:
        """The weight of every training timestep, float32 on the device, made once per schedule
        (in float64, then rounded once): a step only indexes it, with no host round trip."""
        key = (id(scheduler.alphas_cumprod), device)
        if self._table is None or self._table_of != key:
            alphas_cumprod = scheduler.alphas_cumprod
            every = torch.arange(len(alphas_cumprod))
            snr = snr_from_alphas_cumprod(alphas_cumprod, every)
            weights = min_snr_weights(snr, self.config.gamma, scheduler.config.prediction_type)
            self._table, self._table_of = weights.to(device, torch.float32), key
        return self._table

    @hookimpl
    def nlora_loss_weights(self, state, timesteps: torch.Tensor) -> torch.Tensor:
        return self.weight_table(state.noise_scheduler, timesteps.device)[timesteps]


PLUGIN = MinSNR
