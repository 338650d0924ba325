"""The planner's models, optimizer and plugin state, built as the training setup builds them:
on fake tensors from the configs (nothing downloaded), or really, from the model's folder (the
tests' reference run). Every storage is labelled for the report."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.plan.core import LORA, PLUGIN_PREFIX, TEXT_ENCODERS, VAE, WEIGHTS, SimTarget
from naruto_lora.plan.memtrack import HOST_PREFIX, AllocationTracker
from naruto_lora.plan.models import (
    ModelConfigs,
    StandInTokenizer,
    materialise,
    meta_text_encoders,
    meta_unet,
    meta_vae,
    on_meta,
)


def build_unet(
    profile: Profile,
    configs: ModelConfigs,
    pm: Any,
    tracker: AllocationTracker,
    dtype: torch.dtype,
    fake: bool,
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The frozen UNet with the LoRA, through the trainer's own ``train.setup.make_trainable``:
    with real weights from the model's folder, or on fake tensors, where the LoRA goes in on the
    meta device (peft's module moves cannot run on fake tensors) before storage is given."""
    from naruto_lora.train.setup import make_trainable

    if not fake:
        from naruto_lora.models.loading import load_unet

        unet, params = make_trainable(load_unet(profile.model, dtype), profile, pm)
    else:

        def place(module: torch.nn.Module) -> None:
            with tracker.labelled(WEIGHTS):
                materialise(module)

        unet, params = make_trainable(
            meta_unet(configs, dtype), profile, pm, building=on_meta, place=place
        )
    tracker.relabel(unet.parameters(), WEIGHTS)
    tracker.relabel(params, LORA)
    return unet, params


def build_text_encoders(
    profile: Profile,
    configs: ModelConfigs,
    tracker: AllocationTracker,
    dtype: torch.dtype,
    fake: bool,
) -> Any:
    from naruto_lora.models.loading import TextEncoders, load_text_encoders
    from naruto_lora.train.setup import quantize_text_encoders

    if not fake:
        text = load_text_encoders(profile.model, dtype)
        quantize_text_encoders(text, profile)
    else:
        encoders = meta_text_encoders(configs, dtype)
        with on_meta():
            quantize_text_encoders(SimpleNamespace(encoders=encoders), profile)
        with tracker.labelled(TEXT_ENCODERS):
            for encoder in encoders:
                materialise(encoder)
        text = TextEncoders(tokenizers=(StandInTokenizer(), StandInTokenizer()), encoders=encoders)
    for encoder in text.encoders:
        tracker.relabel(encoder.parameters(), TEXT_ENCODERS)
        tracker.relabel(encoder.buffers(), TEXT_ENCODERS)
    return text


def build_vae(
    profile: Profile,
    configs: ModelConfigs,
    tracker: AllocationTracker,
    dtype: torch.dtype,
    fake: bool,
    label: str = VAE,
) -> Any:
    """The VAE in ``dtype``, or fp32 when it would overflow in fp16 (``load_vae_for``'s rule)."""
    from naruto_lora.models.loading import load_vae, vae_is_fp16_safe

    vae = meta_vae(configs, torch.float32) if fake else load_vae(profile.model, torch.float32)
    if dtype == torch.float16 and not vae_is_fp16_safe(profile.model, vae):
        dtype = torch.float32
    if fake:
        with on_meta():
            vae = torch.nn.Module.to(vae, dtype=dtype)
        with tracker.labelled(label):
            materialise(vae)
    else:
        vae = vae.to(dtype)
    vae.requires_grad_(False)
    vae.eval()
    tracker.relabel(vae.parameters(), label)
    return vae


def build_optimizer(
    pm: Any, params: list[torch.nn.Parameter], profile: Profile, target: SimTarget
) -> torch.optim.Optimizer:
    """``train.schedule.make_optimizer`` for the target device (``planning`` on fake tensors:
    an optimizer plugin that cannot build there stands in with the same state)."""
    from naruto_lora.train.schedule import make_optimizer

    return make_optimizer(
        pm, params, profile, torch.device(target.device_type), planning=target.fake
    )


def host_resident(profile: Profile, plugin_name: str) -> bool:
    """A plugin configured with ``device = "cpu"`` keeps its state in host memory."""
    settings = profile.plugins.get(plugin_name)
    return getattr(getattr(settings, "config", None), "device", None) == "cpu"


def start_plugins(pm: Any, state: Any, profile: Profile, tracker: AllocationTracker) -> None:
    """``nlora_train_start``, one plugin at a time, so each plugin's state gets its own label."""
    names = [pm.get_name(impl.plugin) for impl in pm.hook.nlora_train_start.get_hookimpls()]
    everyone = [pm.get_plugin(name) for name in names]
    for name in names:
        others = [p for p in everyone if p is not pm.get_plugin(name)]
        caller = pm.subset_hook_caller("nlora_train_start", remove_plugins=others)
        prefix = HOST_PREFIX if host_resident(profile, name) else ""
        with tracker.labelled(f"{prefix}{PLUGIN_PREFIX}{name}"):
            caller(state=state)
