"""Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
Learner", arXiv 2306.06101): Adam whose step size D is estimated while training, so the
learning rate need not be tuned. ``train.learning_rate`` becomes Prodigy's multiplier of D
(leave it at 1.0); the learning-rate schedule and warm-up still apply to it. Needs
``pip install 'naruto-lora[prodigy]'`` (``prodigyopt``).

Its state (the moments, D and its sums) is in the optimizer's state dict, so checkpoints and
resume carry it; each step's effective learning rate D x lr goes to ``metrics.jsonl`` and the
loss plot as ``effective_lr`` (and D as ``prodigy_d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from naruto_lora.plugins.defaults import PlanningStandIn
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.console import console
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class ProdigyConfig:
    d_coef: float = 1.0  # the preferred knob: 0.5-2 scale the estimated step size
    use_bias_correction: bool = False  # Adam's bias correction in D (often on for diffusion)
    safeguard_warmup: bool = False  # with a long warm-up: keep D from being over-estimated
    growth_rate: float = float("inf")  # cap on D's growth per step (1.02: a gentle warm-up)
    slice_p: int = 1  # estimate D from every p-th element (11: less memory, approximate)

    def validate(self) -> None:
        if not self.d_coef > 0:
            raise UserError(f"plugins.prodigy.d_coef = {self.d_coef!r} must be positive (1.0).")
        if not self.growth_rate > 1:
            raise UserError(
                f"plugins.prodigy.growth_rate = {self.growth_rate!r} must be above 1 (inf: no cap)."
            )
        if self.slice_p < 1:
            raise UserError(f"plugins.prodigy.slice_p = {self.slice_p!r} must be at least 1.")


def prodigy_settings(config: ProdigyConfig, train_cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``prodigyopt.Prodigy`` from the plugin table and the profile."""
    return dict(
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        eps=train_cfg.adam_epsilon,
        weight_decay=train_cfg.adam_weight_decay,
        decouple=True,
        d_coef=config.d_coef,
        use_bias_correction=config.use_bias_correction,
        safeguard_warmup=config.safeguard_warmup,
        growth_rate=config.growth_rate,
        slice_p=config.slice_p,
    )


class Prodigy(Plugin):
    name = "prodigy"
    Config = ProdigyConfig
    description = "Prodigy: Adam with its step size estimated while training (lr stays 1.0)."
    # exp_avg, exp_avg_sq, s and p0 in fp32 (slice_p = 1); an upper bound: Prodigy keeps no p0
    # copy of a tensor that starts all zeros (LoRA's B matrices)
    optimizer_state_bytes = 16.0

    def __init__(self, config: ProdigyConfig):
        super().__init__(config)
        self.optimizer: Any = None

    @hookimpl
    def nlora_build_optimizer(self, params, profile, device, planning) -> torch.optim.Optimizer:
        if planning:  # Prodigy reads values (.item()) every step: the same state, stood in
            return ProdigyStandIn(params, lr=profile.train.learning_rate)
        try:
            from prodigyopt import Prodigy as ProdigyOptimizer
        except ImportError as exc:
            raise UserError(
                "The prodigy plugin needs prodigyopt, which is not installed.",
                hint="pip install 'naruto-lora[prodigy]' (or prodigyopt), or --disable prodigy.",
            ) from exc
        if profile.train.learning_rate < 0.1:
            console.print(
                f"[yellow]Note:[/] with Prodigy, train.learning_rate "
                f"({profile.train.learning_rate:g}) multiplies the estimated step size; "
                "1.0 is usual."
            )
        self.optimizer = ProdigyOptimizer(params, **prodigy_settings(self.config, profile.train))
        return self.optimizer

    @hookimpl
    def nlora_metrics(self, state) -> dict[str, float] | None:
        if self.optimizer is None:
            return None
        group = self.optimizer.param_groups[0]
        return {"effective_lr": group["d"] * group["lr"], "prodigy_d": group["d"]}


class ProdigyStandIn(PlanningStandIn):
    """Holds what ``prodigyopt.Prodigy`` holds per parameter, for the planner: both moments,
    the running sum ``s`` and the starting copy ``p0``, in the parameter's dtype."""

    def initial_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: torch.zeros_like(p) for key in ("s", "p0", "exp_avg", "exp_avg_sq")}


PLUGIN = Prodigy
