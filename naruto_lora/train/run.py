"""What one training run is made of, passed between setup, the loop, checkpoints and the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.plugins.state import TrainState
from naruto_lora.train.conditioning import Conditioner
from naruto_lora.train.guard import NonFiniteGuard
from naruto_lora.train.metrics import MetricsLog, PeakMemory, SmoothedValue
from naruto_lora.train.validation import Validation


@dataclass(frozen=True)
class TrainOptions:
    resume: str | None = None  # "latest" or a checkpoint folder
    auto_cache: bool = True  # build missing/stale caches first (False: that is an error)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    tensorboard: bool = False
    overwrite: bool = False  # replace the run in the output folder
    resume_with_changes: bool = False  # resume although settings differ from the checkpoint's


@dataclass
class DataPosition:
    """Where the data order stands: ``batch`` micro-batches of ``epoch`` are consumed."""

    epoch: int = 0
    batch: int = 0


@dataclass
class Run:
    profile: Profile
    options: TrainOptions
    pm: Any
    accelerator: Any
    state: TrainState
    model: torch.nn.Module  # the UNet as accelerate prepared it (what the forward pass calls)
    optimizer: Any
    lr_scheduler: Any
    dataset: Any
    batches_per_epoch: int
    total_steps: int
    conditioner: Conditioner
    generator: torch.Generator
    guard: NonFiniteGuard
    memory: PeakMemory
    metrics: MetricsLog
    validation: Validation | None
    position: DataPosition = field(default_factory=DataPosition)
    smoothed_loss: SmoothedValue = field(default_factory=SmoothedValue)
    train_s: float = 0.0  # time spent in steps, summed across resumes
    last_checkpoint: Path | None = None
    starting_over: bool = False  # a finished run of the same profile is being replaced
    resume_from: Path | None = None
    resume_changes: list[Any] = field(default_factory=list)  # settings changed on resume

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self) -> Any:
        return self.accelerator.autocast()
