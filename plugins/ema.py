"""EMA of the LoRA parameters only (not the whole UNet): costs the LoRA's size, not +2.5 GB.

Behaviour is implemented with the training loop (issue 4); the configuration lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from naruto_lora.errors import UserError
from naruto_lora.plugins import Plugin


@dataclass(frozen=True)
class EMAConfig:
    decay: float = 0.9999
    # Warm-up of the decay: decay_t = min(decay, (1 + t) / (10 + t)), so early averages are not
    # dominated by the random initial LoRA.
    warmup: bool = True
    device: Literal["same", "cpu"] = "same"

    def validate(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise UserError(f"plugins.ema.decay = {self.decay!r} must be in (0, 1), e.g. 0.9999.")


class EMA(Plugin):
    name = "ema"
    Config = EMAConfig
    description = (
        "Exponential moving average of the LoRA weights; used for validation and saved beside them."
    )


PLUGIN = EMA
