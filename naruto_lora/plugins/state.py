"""The one object training hooks receive (part of the plugin API, beside the hookspecs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.lora.inject import lora_state_dict


@dataclass
class TrainState:
    """What a plugin may read (and, for its own parts, change) during training.

    ``unet`` is the unwrapped UNet with the LoRA injected; ``lora_parameters`` are its trainable
    parameters (fp32). ``global_step`` counts optimizer updates done so far.
    """

    profile: Profile
    unet: torch.nn.Module
    noise_scheduler: Any
    lora_parameters: list[torch.nn.Parameter]
    device: torch.device
    weight_dtype: torch.dtype
    output_dir: Path
    accelerator: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    global_step: int = 0
    epoch: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.unet)
