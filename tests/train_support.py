"""Shared helpers of the training tests: tiny-profile runs, test plugins, loading outputs through
diffusers' own loader."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import load_profile

ALL_PLUGINS = ["ema", "offset_noise", "min_snr", "sdpa", "gradient_checkpointing"]
# Small and fast: the built-in tiny model and shapes (pinned, whatever the tiny profile points
# at), 8 images, rank 4, 4 optimizer steps, no samples, no checkpoints unless a test asks.
BASE_SETS = (
    'model.pretrained="nlora:tiny"',
    'model.vae=""',
    'data.source="nlora:tiny-shapes"',
    "lora.rank=4",
    "lora.alpha=4",
    "data.resolution=64",
    "data.max_items=8",
    "train.max_steps=4",
    "validation.every_steps=0",
    "validation.num_inference_steps=2",
    "train.checkpoint_every=0",
)


def tiny_profile(
    cache_dir: Path,
    output: Path,
    *sets: str,
    enable: list[str] | None = None,
    only: list[str] | None = None,
) -> Profile:
    """The tiny profile with BASE_SETS; ``only`` = exactly these plugins on."""
    overrides = [*BASE_SETS, f'cache.dir="{cache_dir}"', f'train.output_dir="{output}"', *sets]
    enabled = list(enable or [])
    disable: list[str] = []
    if only is not None:
        enabled = list(only)
        disable = [p for p in ALL_PLUGINS if p not in only]
    return load_profile("smoke", overrides=overrides, enable=enabled, disable=disable)


def cli_args(cache_dir: Path, output: Path, *sets: str) -> list[str]:
    args = ["train", "-p", "smoke", "--device", "cpu", "--output", str(output)]
    args += ["--cache-dir", str(cache_dir)]
    for assignment in (*BASE_SETS, *sets):
        args += ["--set", assignment]
    return args


def hide_package(monkeypatch: Any, package: str) -> None:
    """Make ``import package`` (and its submodules) fail as if it were not installed."""
    import builtins

    real_import = builtins.__import__

    def without(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named '{package}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)


class SignalAt:
    """Sends ``signum`` to this process right after optimizer step ``step`` (a real signal,
    delivered to the trainer's handler)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    @hookimpl
    def nlora_after_optimizer_step(self, state: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNLossWeights:
    """Returns NaN loss weights on the listed calls (1-based), nothing otherwise."""

    def __init__(self, bad_calls: set[int] | None = None, always: bool = False) -> None:
        self.bad_calls, self.always, self.calls = bad_calls or set(), always, 0

    @hookimpl
    def nlora_loss_weights(self, state: Any, timesteps: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if self.always or self.calls in self.bad_calls:
            return torch.full((len(timesteps),), math.nan)
        return None


def plugin_manager(profile: Profile, *extra: Any) -> Any:
    from naruto_lora.plugins.manager import build_plugin_manager

    pm = build_plugin_manager(profile)
    for i, plugin in enumerate(extra):
        pm.register(plugin, name=f"test-{i}")
    return pm


def load_with_diffusers(model_dir: Path, lora_folder: Path, monkeypatch: Any) -> tuple[Any, list]:
    """``StableDiffusionXLPipeline.load_lora_weights(folder)``, recording the incompatible keys
    peft reported to diffusers (what diffusers would warn about)."""
    import diffusers.loaders.peft as diffusers_peft
    from diffusers import StableDiffusionXLPipeline

    reports: list = []
    original = diffusers_peft._maybe_warn_for_unhandled_keys

    def record(incompatible_keys: Any, adapter_name: str) -> None:
        reports.append((incompatible_keys, adapter_name))
        original(incompatible_keys, adapter_name)

    monkeypatch.setattr(diffusers_peft, "_maybe_warn_for_unhandled_keys", record)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_folder))
    return pipe, reports


def lora_problems(reports: list) -> list[str]:
    """The LoRA keys diffusers would call unexpected or missing (its own filter)."""
    problems = []
    for keys, adapter in reports:
        problems += [k for k in getattr(keys, "unexpected_keys", []) or [] if ".lora_" in k]
        problems += [
            k for k in getattr(keys, "missing_keys", []) or [] if ".lora_" in k and adapter in k
        ]
    return problems


def unet_inputs(seed: int = 0, batch: int = 2, size: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=g),
        "timestep": torch.tensor([100, 700][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, 80, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 40, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        },
    }
