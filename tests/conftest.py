"""Shared fixtures: a tiny SDXL-architecture model built once per session, in-process, saved in the
diffusers layout; a small generated data set. Nothing is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NLORA_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def nlora_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in assets (``nlora:tiny``) go to a per-session folder, never the user's cache."""
    home = tmp_path_factory.mktemp("nlora-home")
    os.environ["NLORA_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(nlora_home: Path) -> Path:
    """The tiny SDXL (two CLIP encoders, text-time UNet, VAE with factor 2 / scaling 0.5)."""
    from naruto_lora.demo.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_data_dir(nlora_home: Path) -> Path:
    """36 captioned shape images in the imagefolder layout (some wide, some tall)."""
    from naruto_lora.demo.tiny import ensure_tiny_dataset

    return ensure_tiny_dataset()


@pytest.fixture()
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


def invoke(runner, args: list[str]):
    """Run ``nlora ARGS`` through click's CliRunner; return the result."""
    from naruto_lora.cli import cli

    return runner.invoke(cli, args, catch_exceptions=False)
