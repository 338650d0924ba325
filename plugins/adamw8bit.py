"""bitsandbytes' 8-bit AdamW: both moments stored in 8 bits with a scale per 256-element block,
a quarter of AdamW's optimizer state. Needs a CUDA GPU and ``pip install 'naruto-lora[bnb]'``."""

from __future__ import annotations

from typing import Any

import torch

from naruto_lora.plugins.defaults import PlanningStandIn, adam_settings
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError


def _optimizer_key(value: Any) -> dict[str, bool] | None:
    # The old train.optimizer key: "adamw8bit" switches this plugin on, "adamw" changes nothing.
    if value == "adamw8bit":
        return {"enabled": True}
    if value == "adamw":
        return None
    raise UserError(
        f"train.optimizer = {value!r} is not an optimizer naruto-lora knows.",
        hint="Optimizers are plugins now: AdamW is the default; --enable adamw8bit for "
        "bitsandbytes' 8-bit AdamW (`nlora plugins list` shows them all).",
    )


class AdamW8bit(Plugin):
    name = "adamw8bit"
    description = "bitsandbytes' 8-bit AdamW: a quarter of AdamW's optimizer state (CUDA only)."
    replaces = {"train.optimizer": _optimizer_key}
    memory_role = "optimizer_8bit"  # nlora plan --fit may switch it
    memory_advice = "8-bit optimizer state, needs bitsandbytes"
    optimizer_state_bytes = 2 + 2 * 4 / 256  # two uint8 moments, an fp32 scale per 256 each

    @hookimpl
    def nlora_build_optimizer(self, params, profile, device, planning) -> torch.optim.Optimizer:
        settings = adam_settings(profile.train)
        if planning:  # bitsandbytes cannot build on fake tensors: the same state, stood in
            return AdamW8bitStandIn(params, lr=settings["lr"])
        if device.type != "cuda":
            raise UserError(
                f"The adamw8bit plugin needs a CUDA GPU, but this run is on {device.type}.",
                hint="--disable adamw8bit (the LoRA's optimizer state is small anyway).",
            )
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError(
                "The adamw8bit plugin needs bitsandbytes, which is not installed.",
                hint="pip install 'naruto-lora[bnb]' (or bitsandbytes), or --disable adamw8bit.",
            ) from exc
        return bnb.optim.AdamW8bit(params, **settings)


class AdamW8bitStandIn(PlanningStandIn):
    """Holds what bitsandbytes' ``AdamW8bit`` holds, for the planner (bitsandbytes needs a GPU):
    per parameter of 4096+ elements two uint8 moments and an fp32 scale per 256-element block
    (smaller parameters keep fp32 moments), plus the two shared 256-entry code books."""

    BLOCK, MIN_8BIT = 256, 4096

    def initial_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.numel() < self.MIN_8BIT:
            return {"state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
        blocks = -(-p.numel() // self.BLOCK)
        state = {
            "state1": torch.zeros_like(p, dtype=torch.uint8),
            "state2": torch.zeros_like(p, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks, device=p.device),
            "absmax2": torch.zeros(blocks, device=p.device),
        }
        if "qmap1" not in self.defaults:
            self.defaults["qmap1"] = torch.zeros(256, device=p.device)
            self.defaults["qmap2"] = torch.zeros(256, device=p.device)
        return state


PLUGIN = AdamW8bit
