"""The core's own answers to the "exactly one answer" hooks, registered ``trylast`` so any
plugin's answer wins."""

from __future__ import annotations

from typing import Any

import torch

from naruto_lora.plugins.hookspecs import hookimpl


def adam_settings(train_cfg: Any) -> dict[str, Any]:
    """The profile's Adam hyper-parameters, for any Adam-family optimizer plugin too."""
    return dict(
        lr=train_cfg.learning_rate,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.adam_weight_decay,
        eps=train_cfg.adam_epsilon,
    )


def adamw(
    params: list[torch.nn.Parameter], train_cfg: Any, device: torch.device
) -> torch.optim.Optimizer:
    """The core's optimizer: AdamW, with the fused kernel on CUDA (one launch for all params)."""
    return torch.optim.AdamW(params, fused=device.type == "cuda", **adam_settings(train_cfg))


class PlanningStandIn(torch.optim.Optimizer):
    """For an optimizer plugin that cannot run on the planner's fake tensors: holds per
    parameter the state ``initial_state`` gives (what the real optimizer would hold) and steps by
    plain SGD in its place, so the planner counts the same memory."""

    def __init__(self, params: list[torch.nn.Parameter], **defaults: Any) -> None:
        super().__init__(params, defaults)

    def initial_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self.initial_state(p))
                p.add_(p.grad, alpha=-group["lr"])  # stands in for the real update


class CoreDefaults:
    @hookimpl(trylast=True)
    def nlora_sample_noise(self, state, latents: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )

    @hookimpl(trylast=True)
    def nlora_build_optimizer(self, params, profile, device, planning) -> torch.optim.Optimizer:
        return adamw(params, profile.train, device)

    @hookimpl(trylast=True)
    def nlora_wrap_model(self, model, profile) -> torch.nn.Module:
        return model

    @hookimpl(trylast=True)
    def nlora_sample_timesteps(self, state, batch_size: int, device, generator) -> torch.Tensor:
        num = state.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, num, (batch_size,), generator=generator, device=device).long()
