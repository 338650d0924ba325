"""TF32 for fp32 matmuls and convolutions on NVIDIA Ampere and later: fp32's range with a 10-bit
mantissa, several times faster on tensor cores. It touches only what runs in fp32 (the LoRA
parameters' own math, fp32 parts of mixed precision); no effect off CUDA."""

from __future__ import annotations

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin


class TF32(Plugin):
    name = "tf32"
    description = "TF32 matmuls and convolutions on Ampere and later GPUs (CUDA only)."
    replaces = {"train.allow_tf32": lambda on: {"enabled": bool(on)}}

    @hookimpl
    def nlora_prepare_unet(self, unet, profile, training: bool) -> None:
        if torch.cuda.is_available():  # process-wide switches; nothing to do without CUDA
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


PLUGIN = TF32
