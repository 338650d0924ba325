"""The profile's speed switches reach the training run: channels-last memory format (same
result), torch.compile of the prepared model (hooks and saving keep the plain UNet), fused AdamW;
each a plugin now, the old [train] keys still read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.schedule import make_optimizer
from naruto_lora.train.setup import setup_run
from tests.train_support import tiny_profile


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speed-cache")


def test_channels_last_trains_to_the_same_weights(cache_dir: Path, tmp_path: Path) -> None:
    sets = ("train.max_steps=2",)
    plain = train(
        tiny_profile(cache_dir, tmp_path / "plain", *sets, only=[]), TrainOptions(device="cpu")
    )
    nhwc_profile = tiny_profile(
        cache_dir, tmp_path / "nhwc", *sets, "plugins.channels_last.enabled=true", only=[]
    )
    run = setup_run(nhwc_profile, TrainOptions(device="cpu"))
    conv = run.state.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nhwc = train(nhwc_profile, TrainOptions(device="cpu"))
    from safetensors.torch import load_file

    a = load_file(plain.output_dir / "pytorch_lora_weights.safetensors")
    b = load_file(nhwc.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_compile_wraps_the_model_but_not_the_state_unet(cache_dir: Path, tmp_path: Path) -> None:
    profile = tiny_profile(
        cache_dir, tmp_path / "compiled", "plugins.compile.enabled=true", only=[]
    )
    run = setup_run(profile, TrainOptions(device="cpu"))
    assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)
    assert run.model._orig_mod is run.state.unet  # hooks and saving see the plain module
    plain = setup_run(
        tiny_profile(cache_dir, tmp_path / "uncompiled", only=[]), TrainOptions(device="cpu")
    )
    assert not isinstance(plain.model, torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.parametrize(("device", "expected"), [("cuda", True), ("cpu", False)])
def test_the_core_adamw_is_fused_on_cuda(device: str, expected: bool) -> None:
    profile = load_profile("14gb")
    param = torch.nn.Parameter(torch.zeros(3))
    pm = build_plugin_manager(profile)
    optimizer = make_optimizer(pm, [param], profile, torch.device(device))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert bool(optimizer.param_groups[0]["fused"]) is expected


def test_old_speed_keys_still_work_with_a_deprecation_message(capsys) -> None:
    old = load_profile(
        "smoke",
        overrides=[
            "train.compile=true",
            "train.channels_last=true",
            "train.allow_tf32=false",
            'train.optimizer="adamw8bit"',
            "train.fused_optimizer=false",
        ],
    )
    enabled = set(old.enabled_plugins())
    assert {"compile", "channels_last", "adamw8bit"} <= enabled and "tf32" not in enabled
    said = capsys.readouterr().err
    assert "train.compile = true (--set) is now [plugins.compile] enabled = true" in said
    assert "train.fused_optimizer (--set) is ignored" in said
