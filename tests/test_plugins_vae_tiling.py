"""The vae_tiling plugin: validation decodes tile by tile (close to the whole-image decode,
which is the reference), encoding is untouched, and the planner sees the smaller decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.util.errors import UserError


def tiled(tile_px: int):
    profile = load_profile(
        "smoke", enable=["vae_tiling"], overrides=[f"plugins.vae_tiling.tile_px={tile_px}"]
    )
    return profile, build_plugin_manager(profile)


def test_decode_goes_tile_by_tile_as_diffusers_tiles_and_encoding_is_untouched(
    tiny_model_dir: Path,
):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    reference = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        whole = vae.decode(latents).sample
        profile, pm = tiled(64)
        calls = []
        decoder_forward = vae.decoder.forward
        vae.decoder.forward = lambda z, *a, **k: (
            calls.append(z.shape) or decoder_forward(z, *a, **k)
        )
        pm.hook.nlora_prepare_validation_vae(vae=vae, profile=profile)
        tiles = vae.decode(latents).sample
        again = vae.encode(images).latent_dist.mean
        # diffusers' own tiling with the same tile sizes is the reference
        reference.enable_tiling()
        reference.tile_sample_min_size, reference.tile_latent_min_size = 64, 32
        reference.tile_overlap_factor = 0.25
        expected = reference.decode(latents).sample
    assert len(calls) > 1 and all(shape[-1] <= 64 // 2 for shape in calls)  # VAE factor 2
    torch.testing.assert_close(tiles, expected, rtol=0, atol=0)
    assert tiles.shape == whole.shape and not torch.equal(tiles, whole)
    torch.testing.assert_close(again, latents, rtol=0, atol=0)  # encoding as before


def test_tiles_lower_the_decode_peak_and_the_planner_applies_them(tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL

    from naruto_lora.plan.memtrack import AllocationTracker
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plan.sim import simulate_training

    latents = torch.randn(1, 4, 128, 128)  # 256 px
    peaks = {}
    for tiles in (False, True):
        vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()
        if tiles:
            profile, pm = tiled(64)
            pm.hook.nlora_prepare_validation_vae(vae=vae, profile=profile)
        with torch.no_grad(), AllocationTracker() as tracker:
            vae.decode(latents)
        peaks[tiles] = tracker.peak.total_bytes
    assert peaks[True] < 0.5 * peaks[False]

    profile, pm = tiled(64)
    seen = []
    pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(name), lambda *a: None)
    simulate_training(profile, load_model_configs(profile.model), pm=pm)
    assert "nlora_prepare_validation_vae" in seen


def test_tile_size_is_checked() -> None:
    with pytest.raises(UserError, match="tile_px"):
        load_profile("smoke", enable=["vae_tiling"], overrides=["plugins.vae_tiling.tile_px=60"])
