"""The published SDXL configs reproduce the architecture's known sizes (built on the meta device:
no weights, no download), and the planner finds the configs of the model it is given."""

from __future__ import annotations

import json

import pytest
import torch

from naruto_lora.config.profile import LoraConfig
from naruto_lora.models import sdxl_configs
from naruto_lora.plugins.manager import load_profile
from naruto_lora.util.errors import UserError

UNET_PARAMETERS = 2_567_463_684
LORA_RANK_16 = 23_224_320
LORA_RANK_8 = 11_612_160
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def configs():
    from naruto_lora.plan.models import ModelConfigs

    return ModelConfigs(**sdxl_configs.published_configs(), source="published")


def test_unet_has_the_published_parameter_count(configs):
    from naruto_lora.plan.models import meta_unet

    unet = meta_unet(configs, torch.float16)
    count = sum(p.numel() for p in unet.parameters())
    assert count == UNET_PARAMETERS
    # 5.13 GB in fp16 / bf16.
    assert round(count * 2 / 1e9, 2) == 5.13


def _lora_by_formula(unet: torch.nn.Module, rank: int) -> int:
    """rank x (in + out) for every Linear a target names: A is rank x in, B is out x rank."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in TARGETS
        ):
            total += rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize(("rank", "expected"), [(16, LORA_RANK_16), (8, LORA_RANK_8)])
def test_lora_parameter_counts(configs, rank, expected):
    from naruto_lora.lora.inject import inject_lora
    from naruto_lora.plan.models import meta_unet, on_meta

    unet = meta_unet(configs, torch.float16)
    formula = _lora_by_formula(unet, rank)
    with on_meta():
        params = inject_lora(unet, LoraConfig(rank=rank, alpha=rank, target_modules=TARGETS))
    assert sum(p.numel() for p in params) == expected == formula
    assert all(p.dtype == torch.float32 for p in params)


def test_text_encoders_hold_about_0_82_billion_parameters(configs):
    from naruto_lora.plan.models import meta_text_encoders

    encoders = meta_text_encoders(configs, torch.float16)
    count = sum(p.numel() for e in encoders for p in e.parameters())
    assert 0.81e9 < count < 0.83e9
    assert 1.6 < count * 2 / 1e9 < 1.7  # about 1.6 GB in fp16
    assert all(not p.requires_grad for e in encoders for p in e.parameters())


def test_vae_config_matches_sdxl_scale(configs):
    assert configs.vae_scale_factor == 8
    assert configs.default_resolution == 1024
    assert configs.vae["scaling_factor"] == 0.13025


def test_local_folder_configs_are_read_not_assumed(tiny_model_dir):
    from naruto_lora.plan.models import load_model_configs

    profile = load_profile("smoke")
    found = load_model_configs(profile.model, str(tiny_model_dir))
    on_disk = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    assert found.unet["block_out_channels"] == on_disk["block_out_channels"]
    # The tiny VAE is deliberately not SDXL's: factor 2, scaling 0.5.
    assert found.vae_scale_factor == 2
    assert found.vae["scaling_factor"] == 0.5
    assert found.notes == ()


def test_uncached_hub_id_falls_back_to_published_configs_and_says_so(monkeypatch, tmp_path):
    from naruto_lora.plan.models import load_model_configs

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    profile = load_profile("14gb")
    found = load_model_configs(profile.model)
    assert found.unet == sdxl_configs.UNET
    assert found.vae["force_upcast"] is False  # the profile's fp16-fix VAE
    assert any("published SDXL" in note for note in found.notes)


def test_a_non_sdxl_folder_is_a_user_error(tmp_path, tiny_model_dir):
    import shutil

    from naruto_lora.plan.models import load_model_configs

    folder = tmp_path / "sd15-like"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["addition_embed_type"] = None
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not an SDXL-architecture"):
        load_model_configs(load_profile("smoke").model, str(folder))
