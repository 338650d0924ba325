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
    params: list[torch.nn.Parameter], train_cfg: Any, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (the fused kernel on CUDA), or bitsandbytes' 8-bit AdamW when the profile asks."""
    kwargs = dict(
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.adam_weight_decay,
        eps=train_cfg.adam_epsilon,
    )
    if train_cfg.optimizer == "adamw8bit":
        return _adamw8bit(params, device, kwargs)
    fused = device.type == "cuda" and train_cfg.fused_optimizer
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def _adamw8bit(params: list[torch.nn.Parameter], device: torch.device, kwargs: dict) -> Any:
    if device.type != "cuda":
        raise UserError(
            f"train.optimizer = 'adamw8bit' needs a CUDA GPU, but this run is on {device.type}.",
            hint="Set train.optimizer = 'adamw' (the LoRA's optimizer state is small anyway).",
        )
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(
            "train.optimizer = 'adamw8bit' needs bitsandbytes, which is not installed.",
            hint="pip install 'naruto-lora[bnb]' (or bitsandbytes), or set train.optimizer = 'adamw'.",
        ) from exc
    return bnb.optim.AdamW8bit(params, **kwargs)
