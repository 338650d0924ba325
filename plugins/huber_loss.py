"""Huber (or smooth-L1) loss in place of the mean squared error, with a delta that may change
with the timestep, as kohya's sd-scripts (``--loss_type huber --huber_schedule``) and the
diffusers scripts' scheduled Huber loss offer (Khrapov et al. 2024, "Improving Diffusion
Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", arXiv 2403.16728).

Per element e = prediction - target, with delta d(t):

* ``huber``:     0.5 e^2 where |e| <= d, else d (|e| - d / 2)  (``torch.nn.functional.huber_loss``)
* ``smooth_l1``: the same divided by d                          (``smooth_l1_loss`` with beta = d)

averaged over each sample's elements; other plugins' loss weights (Min-SNR) multiply the result.
Schedules of d(t), with ``delta`` as d_0 and T the scheduler's training timesteps:

* ``constant``:    d(t) = delta
* ``exponential``: d(t) = exp(t ln(delta) / T), from 1 at t = 0 down to delta at t = T
* ``snr``:         d(t) = (1 - delta) / (1 + sigma_t)^2 + delta, sigma_t = sqrt((1 - abar_t) / abar_t),
  from 1 at low noise to delta at high noise
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError

LOSS_TYPES = ("huber", "smooth_l1")
SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class HuberLossConfig:
    loss_type: Literal["huber", "smooth_l1"] = "huber"
    delta: float = 0.1
    schedule: Literal["constant", "exponential", "snr"] = "snr"

    def validate(self) -> None:
        if not 0 < self.delta <= 1:
            raise UserError(
                f"plugins.huber_loss.delta = {self.delta!r} must be in (0, 1] (0.1 is usual)."
            )


def huber_deltas(
    schedule: str, delta: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """d(t) for each timestep (fp32), by the formulas in the module's docstring."""
    t = timesteps.to(torch.float64)
    if schedule == "constant":
        d = torch.full_like(t, delta)
    elif schedule == "exponential":
        d = torch.exp(t * math.log(delta) / len(alphas_cumprod))
    elif schedule == "snr":
        abar = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]
        sigma = ((1.0 - abar) / abar).sqrt()
        d = (1.0 - delta) / (1.0 + sigma) ** 2 + delta
    else:
        raise ValueError(f"unknown Huber schedule {schedule!r}")
    return d.to(torch.float32)


def per_sample_huber(
    prediction: torch.Tensor, target: torch.Tensor, deltas: torch.Tensor, loss_type: str
) -> torch.Tensor:
    """Each sample's mean Huber (or smooth-L1) loss with its own delta, in fp32."""
    error = (prediction.float() - target.float()).abs()
    d = deltas.to(error.device).view(-1, *([1] * (error.ndim - 1)))
    loss = torch.where(error <= d, 0.5 * error**2, d * (error - 0.5 * d))
    if loss_type == "smooth_l1":
        loss = loss / d
    return loss.mean(dim=tuple(range(1, loss.ndim)))


class HuberLoss(Plugin):
    name = "huber_loss"
    Config = HuberLossConfig
    description = "Huber / smooth-L1 loss with a scheduled delta: robust to outlier pixels."

    @hookimpl
    def nlora_per_sample_loss(self, state, prediction, target, timesteps) -> torch.Tensor:
        deltas = huber_deltas(
            self.config.schedule,
            self.config.delta,
            timesteps,
            state.noise_scheduler.alphas_cumprod,
        )
        return per_sample_huber(prediction, target, deltas, self.config.loss_type)


PLUGIN = HuberLoss
