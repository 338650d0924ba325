"""``nlora plan`` prints the LoRA's trainable parameter count (checked against the real tiny
UNet with the LoRA injected), and ``--fit`` may decode validation samples in tiles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from naruto_lora.plugins.manager import load_profile
from tests.conftest import invoke


def test_plan_prints_the_trainable_lora_parameter_count(cli_runner, tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    from naruto_lora.lora.inject import inject_lora

    profile = load_profile("smoke")
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    count = sum(p.numel() for p in inject_lora(unet, profile.lora))
    result = invoke(cli_runner, ["plan", "--profile", "smoke", "--no-sample", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert f"LoRA: {count:,} trainable parameters (rank 4 on to_q, to_k" in result.output


def model_for(profile, validation_activations: int):
    from naruto_lora.plan.fit import MemoryModel

    return MemoryModel(
        base=profile,
        weights=10 * 2**20,
        text_encoders=0,
        vae=2**20,
        lora_per_rank=1000.0,
        plugin_bytes_per_param={},
        train_activations={True: 2**20, False: 4 * 2**20},
        validation_activations=validation_activations,
        flops_per_image={True: 1e12, False: 1e12},
        text_flops_per_image=0.0,
    )


def test_fit_may_decode_validation_samples_in_tiles() -> None:
    from naruto_lora.plan.fit import candidates, current_candidate

    profile = load_profile("14gb")  # 1024 px, validation every 500 steps
    found = list(candidates(profile))
    assert any(c.tiled_decode for c in found)
    assert not any(c.tiled_decode and not c.validation for c in found)
    now = current_candidate(profile)
    assert now.validation and not now.tiled_decode
    tiled = dataclasses.replace(now, tiled_decode=True)
    assert tiled.assignments(profile)["plugins.vae_tiling.enabled"] is True
    # the decode dominates: 512 px tiles of a 1024 px image hold a quarter of its activations
    model = model_for(profile, validation_activations=40 * 2**20)
    whole, tiles = model.peak_bytes(now), model.peak_bytes(tiled)
    lora = model.lora_state(now, False)
    assert whole - tiles == (40 * 2**20) * 3 / 4
    assert tiles == 10 * 2**20 + 2**20 + lora + 10 * 2**20
