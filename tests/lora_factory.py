"""Training outputs made directly (no trainer): the tiny UNet, a LoRA injected with the project's
own ``inject_lora``, random non-zero ``lora_B`` so the LoRA changes the output, written with
``save_lora`` in the training output layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from naruto_lora.config.profile import LoraConfig
from naruto_lora.lora import inject as lora
from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME
from naruto_lora.plugins.manager import load_profile

# Attention projections plus ResBlock convs (3x3 and 1x1), a time-embedding Linear, a transformer
# projection and the feed-forward output: every kind of layer the kohya mapping has to name.
WIDE_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "ff.net.2",
    "conv1",
    "conv_shortcut",
    "time_emb_proj",
)


def lora_unet(
    model_dir: Path,
    rank: int = 4,
    alpha: float = 2.0,
    targets=WIDE_TARGETS,
    seed: int = 0,
    strength: float = 0.05,
    dora: bool = False,
):
    """The tiny UNet with an injected LoRA: lora_A as peft initialises it, lora_B random with std
    ``strength`` (lora_B starts at zero in training; non-zero here so the LoRA changes the output,
    by about half the output's range at 0.05, a realistic trained strength). With ``dora`` the
    DoRA magnitudes are also moved off their start (the row norms) by 20 % at random, so that a
    loader which ignored them would give another UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    config = LoraConfig(rank=rank, alpha=alpha, target_modules=tuple(targets), use_dora=dora)
    lora.inject_lora(unet, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * strength
        elif "lora_magnitude_vector" in name:
            param.data = param.data * (1 + 0.2 * torch.randn(param.shape, generator=generator))
    return unet


def training_metadata(steps: int = 40, rank: int = 4, alpha: float = 2.0) -> dict[str, str]:
    """What the trainer writes beside the adapter config (naruto_lora.train.outputs)."""
    return {
        "base_model": "nlora:tiny",
        "vae": "(the model's own)",
        "profile": "smoke",
        "rank": str(rank),
        "alpha": f"{alpha:g}",
        "resolution": "64",
        "steps": str(steps),
        "training_seconds": "12.5",
    }


def make_output(
    folder: Path,
    model_dir: Path,
    rank: int = 4,
    alpha: float = 2.0,
    targets=WIDE_TARGETS,
    ema: bool = False,
    seed: int = 0,
    strength: float = 0.05,
    checkpoint_step: int | None = None,
    dora: bool = False,
) -> Path:
    """A training output folder: weights, the resolved profile, optionally EMA weights (a
    different random LoRA of the same shape) and a checkpoint."""
    unet = lora_unet(model_dir, rank, alpha, targets, seed, strength, dora)
    meta = lora.adapter_metadata(unet)
    lora.save_lora(
        folder, lora.lora_state_dict(unet), meta, training_metadata(rank=rank, alpha=alpha)
    )
    if ema:
        ema_unet = lora_unet(model_dir, rank, alpha, targets, seed + 1000, strength, dora)
        lora.save_lora(
            folder / EMA_SUBFOLDER,
            lora.lora_state_dict(ema_unet),
            meta,
            training_metadata(rank=rank, alpha=alpha),
        )
    if checkpoint_step is not None:
        step_dir = folder / "checkpoints" / f"step-{checkpoint_step}"
        lora.save_lora(
            step_dir, lora.lora_state_dict(unet), meta, training_metadata(rank=rank, alpha=alpha)
        )
    profile = load_profile(
        "smoke",
        overrides=[
            f"model.pretrained={str(model_dir)!r}",
            f"lora.rank={rank}",
            f"lora.alpha={alpha}",
            f"lora.use_dora={str(dora).lower()}",
        ],
    )
    profile = dataclasses.replace(
        profile, lora=dataclasses.replace(profile.lora, target_modules=tuple(targets))
    )
    (folder / "profile.toml").write_text(profile.to_toml())
    return folder / WEIGHT_NAME
