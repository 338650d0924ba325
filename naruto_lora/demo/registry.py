"""The demo world's ``nlora:`` ids, registered into ``naruto_lora.models.registry`` through the
``nlora.ids`` entry point (``pyproject.toml``)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from naruto_lora.demo import tiny, toy


def _generated(folder: Path, version: str) -> tuple[bool, str]:
    if tiny.is_ready(folder, version):
        return True, f"built in ({folder})"
    return True, "built in; generated on first use (seconds)"


def _shipped() -> tuple[bool, str]:
    folder = toy.toy_base_dir()
    if (folder / "model_index.json").is_file():
        return True, f"shipped with naruto-lora ({folder})"
    return False, f"missing from this installation (looked in '{folder}'); reinstall"


def register(registry: ModuleType) -> None:
    entry = registry.BuiltinId
    for item in (
        entry(
            tiny.TINY_MODEL_ID,
            "model",
            lambda: str(tiny.ensure_tiny_model()),
            lambda: _generated(tiny.tiny_model_dir(), tiny.TINY_VERSION),
            "random weights, SDXL's architecture at toy size (fast tests)",
        ),
        entry(
            tiny.TINY_DATA_ID,
            "data",
            lambda: str(tiny.ensure_tiny_dataset()),
            lambda: _generated(tiny.tiny_dataset_dir(), tiny.TINY_VERSION),
            "captioned coloured shapes for nlora:tiny",
        ),
        entry(
            toy.TOY_BASE_ID,
            "model",
            toy.resolve_toy_model,
            _shipped,
            "the trained toy base of the style demo (package data)",
        ),
        entry(
            toy.TOY_STYLE_ID,
            "data",
            lambda: str(toy.ensure_toy_dataset(styled=True)),
            lambda: _generated(toy.toy_dataset_dir(True), toy.TOY_DATA_VERSION),
            "the style demo's training set (orange background, black ink)",
        ),
        entry(
            toy.TOY_PLAIN_ID,
            "data",
            lambda: str(toy.ensure_toy_dataset(styled=False)),
            lambda: _generated(toy.toy_dataset_dir(False), toy.TOY_DATA_VERSION),
            "every toy scene in the plain look",
        ),
    ):
        registry.register(item)
