"""How long a run is and how its learning rate moves: small pure helpers beside the loop."""

from __future__ import annotations

from typing import Any

import torch

from naruto_lora.util.errors import UserError


def plan_total_steps(max_steps: int, epochs: int, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer updates of a run: ``max_steps``, or fewer when ``epochs`` run out first.

    Micro-batches flow on across epoch boundaries (an accumulation window may span two epochs),
    so ``epochs`` passes give ``epochs * batches_per_epoch // accumulation`` updates.
    """
    by_epochs = (epochs * batches_per_epoch) // accumulation
    if by_epochs < 1:
        raise UserError(
            f"train.epochs = {epochs} over {batches_per_epoch} batch(es) per epoch is fewer than "
            f"one optimizer update (train.gradient_accumulation_steps = {accumulation}).",
            hint="Raise train.epochs or data.max_items, or lower train.gradient_accumulation_steps.",
        )
    return min(max_steps, by_epochs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Any, total_steps: int) -> Any:
    """diffusers' named schedule with linear warm-up, stepped once per optimizer update.

    Not handed to ``accelerator.prepare``: accelerate would step it once per process, which
    needs every step count scaled by the process count; stepping it ourselves keeps one clock.
    """
    from diffusers.optimization import get_scheduler

    warmup = min(train_cfg.lr_warmup_steps, total_steps)
    return get_scheduler(
        train_cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )


def make_optimizer(
    pm: Any,
    params: list[torch.nn.Parameter],
    profile: Any,
    device: torch.device,
    planning: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer the ``nlora_build_optimizer`` hook answers (core default:
    ``plugins.defaults.adamw``)."""
    return pm.hook.nlora_build_optimizer(
        params=params, profile=profile, device=device, planning=planning
    )
