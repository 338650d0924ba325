"""torch.compile of the training step's UNet: fused kernels and fewer launches after a warm-up
of a minute or more; the hooks and the saved weights keep seeing the plain UNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin


@dataclass(frozen=True)
class CompileConfig:
    mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"


class Compile(Plugin):
    name = "compile"
    Config = CompileConfig
    description = "torch.compile the UNet the training step calls (faster steps after warm-up)."
    changes_training = False  # the same computation, compiled
    replaces = {"train.compile": lambda on: {"enabled": bool(on)}}

    @hookimpl
    def nlora_wrap_model(self, model, profile) -> torch.nn.Module:
        mode = None if self.config.mode == "default" else self.config.mode
        return torch.compile(model, mode=mode)


PLUGIN = Compile
