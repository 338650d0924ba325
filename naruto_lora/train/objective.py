"""What the UNet is trained to predict and how its error becomes one loss: pure helpers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from naruto_lora.data.preprocess import TIME_ID_FIELDS
from naruto_lora.util.errors import UserError


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target for the scheduler config's ``prediction_type``.

    epsilon: the noise itself; v_prediction: v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0
    (Salimans & Ho 2022), via the scheduler so the schedule is the model's own.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(
        f"The model's scheduler config has prediction_type '{kind}'; training supports "
        "'epsilon' and 'v_prediction'.",
        hint="Use an SDXL base model whose scheduler/scheduler_config.json names one of those.",
    )


class TimestepWeightTable:
    """A loss weight for every training timestep, made once per noise schedule and device.

    ``weights_of(snr, scheduler)`` maps the float64 SNR of every timestep, alpha_bar / (1 -
    alpha_bar) from the scheduler's ``alphas_cumprod``, to its weights; the table is rounded once
    to float32 on the device, so a training step only indexes it, with no host round trip.
    """

    def __init__(self, weights_of: Any):
        self._weights_of = weights_of
        self._table: torch.Tensor | None = None
        self._table_of: tuple[int, torch.device] | None = None

    def __call__(self, scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
        key = (id(scheduler.alphas_cumprod), timesteps.device)
        if self._table is None or self._table_of != key:
            alpha_bar = scheduler.alphas_cumprod.to(torch.float64)
            weights = self._weights_of(alpha_bar / (1.0 - alpha_bar), scheduler)
            self._table, self._table_of = weights.to(timesteps.device, torch.float32), key
        return self._table[timesteps]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (shape ``[batch]``), computed in fp32 so fp16
    activations do not round the loss away."""
    error = (prediction.float() - target.float()) ** 2
    return error.mean(dim=tuple(range(1, error.ndim)))


def combine_loss_weights(
    contributions: Iterable[torch.Tensor | None], batch_size: int
) -> torch.Tensor | None:
    """The product of every plugin's per-sample weights; None when nobody contributed."""
    combined: torch.Tensor | None = None
    for weights in contributions:
        if weights is None:
            continue
        if weights.shape != (batch_size,):
            raise ValueError(
                f"a nlora_loss_weights implementation returned shape {tuple(weights.shape)}, "
                f"expected ({batch_size},)"
            )
        combined = weights.float() if combined is None else combined * weights.float()
    return combined


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The batch loss: the mean of the (weighted) per-sample losses."""
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.device)).mean()


def batch_time_ids(
    time_ids: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The batch's per-item time ids (each item's real original size and crop) for the UNet."""
    if time_ids.ndim != 2 or time_ids.shape[1] != len(TIME_ID_FIELDS):
        raise ValueError(f"time_ids must have shape [batch, 6], got {tuple(time_ids.shape)}")
    return time_ids.to(device=device, dtype=dtype)
