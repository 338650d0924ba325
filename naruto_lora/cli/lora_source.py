"""``--lora`` / ``--ema`` and which profile (hence base model) goes with a LoRA, for ``sample``
and ``export``.

A training output folder holds the run's resolved ``profile.toml``. Unless ``--profile`` is given
on the command line, that file is the profile: the LoRA is used with the model and VAE it was
trained on. ``--model``, ``--vae`` and ``--set`` still override it, as they override any profile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from naruto_lora.cli.common import load_profile_from_options

RUN_PROFILE_NAME = "profile.toml"


def lora_options(func: Callable) -> Callable:
    options = [
        click.option(
            "--lora",
            "lora_path",
            default=None,
            metavar="PATH",
            help="Training output folder, checkpoint folder or .safetensors file "
            "(diffusers, peft or kohya keys). Default: the profile's train.output_dir.",
        ),
        click.option(
            "--ema", is_flag=True, help="Use the EMA weights of the run (OUTPUT/ema_unet/)."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_profile_path(lora_file: Path) -> Path | None:
    """The ``profile.toml`` of the run a weights file belongs to: beside it, or up to two folders
    up (``ema_unet/`` and ``checkpoints/step-N/`` sit inside the output folder)."""
    for folder in [lora_file.parent, *lora_file.parent.parents][:3]:
        candidate = folder / RUN_PROFILE_NAME
        if candidate.is_file():
            return candidate
    return None


def _load_run_profile(path: Path) -> Any:
    """The run's profile under the name it was trained with (loading a file names it after the
    file, and every run's file is called profile.toml)."""
    import dataclasses

    from naruto_lora.config.profile import tomllib  # tomllib, or tomli before Python 3.11
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(str(path))
    name = tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    return dataclasses.replace(profile, name=name) if isinstance(name, str) and name else profile


def resolve_lora_source(ctx: click.Context, kwargs: dict[str, Any]) -> tuple[Path, Any, Any]:
    """Pop the LoRA and profile options from ``kwargs``; return (weights file, profile to use,
    the run's own profile or None). Facts about the training come only from the latter."""
    from naruto_lora.lora.inject import find_lora_file

    lora_path, ema = kwargs.pop("lora_path"), kwargs.pop("ema")
    profile_given = ctx.get_parameter_source("profile_name") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
    options = dict(kwargs)
    profile = load_profile_from_options(kwargs)  # validates the options either way
    lora_file = find_lora_file(lora_path or profile.train.output_dir, ema=ema)
    run_path = run_profile_path(lora_file)
    run_profile = _load_run_profile(run_path) if run_path is not None else None
    if run_path is not None and not profile_given:
        options["profile_name"] = str(run_path)
        profile = load_profile_from_options(options)
    return lora_file, profile, run_profile
