"""EMA of the LoRA parameters only (not the whole UNet): costs the LoRA's size, not +2.5 GB.

After every optimizer update each shadow weight moves toward its parameter,

    shadow <- decay_t * shadow + (1 - decay_t) * param,
    decay_t = min(decay, (1 + t) / (10 + t))   with warm-up (t = updates so far, from 0),
    decay_t = decay                            without,

the warm-up being the one of diffusers' ``EMAModel`` / timm's ``ModelEmaV2``. The shadow lives on
the parameters' device or on the CPU (``device = "cpu"``: no GPU memory at all, one copy per
update), is saved in checkpoints, is swapped in while validation samples are drawn, and is written
to ``ema_unet/pytorch_lora_weights.safetensors`` beside the raw weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from naruto_lora.lora.inject import EMA_SUBFOLDER, trainable_parameters
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError


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


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay used for update number ``num_updates`` (0 for the first update)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA(Plugin):
    name = "ema"
    Config = EMAConfig
    description = (
        "Exponential moving average of the LoRA weights; used for validation and saved beside them."
    )

    def __init__(self, config: EMAConfig):
        super().__init__(config)
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        # The same parameters and shadows as aligned lists, made once per run: walking
        # named_parameters() each update costs more than the update on a small LoRA.
        self._params: list[torch.nn.Parameter] = []
        self._shadows: list[torch.Tensor] = []

    def _device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.config.device == "cpu" else param.device

    def _align(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._params = list(params.values())
        self._shadows = [self.shadow[name] for name in params]

    @hookimpl
    def nlora_train_start(self, state: Any) -> None:
        params = trainable_parameters(state.unet)
        self.shadow = {
            name: p.detach().to(self._device(p), torch.float32, copy=True)
            for name, p in params.items()
        }
        self.num_updates = 0
        self._align(params)

    @hookimpl
    def nlora_after_optimizer_step(self, state: Any) -> None:
        decay = ema_decay(self.config.decay, self.num_updates, self.config.warmup)
        with torch.no_grad():
            params = [p.detach() for p in self._params]
            if self.config.device == "cpu" or any(p.dtype != torch.float32 for p in params):
                params = [
                    p.to("cpu" if self.config.device == "cpu" else p.device, torch.float32)
                    for p in params
                ]
            # lerp: shadow + (1 - decay) * (param - shadow), the update rule in one op; the
            # foreach form updates every tensor in one call (one fused kernel on CUDA).
            torch._foreach_lerp_(self._shadows, params, 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self, state: Any) -> Iterator[None]:
        """The shadow weights in the UNet for the duration; the trained weights restored after
        (exactly: they are kept aside, not recomputed)."""
        params = trainable_parameters(state.unet)
        kept = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(kept[name])

    @hookimpl(wrapper=True)
    def nlora_validation_weights(self, state: Any) -> Iterator[None]:
        with self.swapped_in(state):
            return (yield)

    @hookimpl
    def nlora_checkpoint_state(self, state: Any) -> dict[str, Any]:
        shadow = {name: t.detach().cpu() for name, t in self.shadow.items()}
        return {self.name: {"shadow": shadow, "num_updates": self.num_updates}}

    @hookimpl
    def nlora_load_checkpoint_state(self, state: Any, saved: dict[str, Any]) -> None:
        if self.name not in saved:
            return  # a run without EMA until now: the shadow starts from the resumed weights
        mine = saved[self.name]
        params = trainable_parameters(state.unet)
        if set(mine["shadow"]) != set(params):
            raise UserError(
                "The checkpoint's EMA weights do not match this run's LoRA parameters.",
                hint="Resume with the profile the checkpoint was written with.",
            )
        self.shadow = {
            name: t.to(self._device(params[name]), torch.float32)
            for name, t in mine["shadow"].items()
        }
        self.num_updates = int(mine["num_updates"])
        self._align(params)

    @hookimpl
    def nlora_lora_weights_to_save(self, state: Any) -> dict[str, dict[str, torch.Tensor]]:
        with self.swapped_in(state):
            return {EMA_SUBFOLDER: state.lora_state_dict()}


PLUGIN = EMA
