"""The demo's generated data sets and the ids that resolve to them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from naruto_lora.demo import toy
from naruto_lora.models.loading import resolve_data, resolve_model


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.png")) + [folder / "metadata.jsonl"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_style_set_is_deterministic_and_leaves_out_the_held_out_scenes(tmp_path: Path) -> None:
    first = toy.write_toy_dataset(tmp_path / "a", styled=True)
    second = toy.write_toy_dataset(tmp_path / "b", styled=True)
    assert _digest(first) == _digest(second)
    rows = [json.loads(line) for line in (first / "metadata.jsonl").read_text().splitlines()]
    captions = {row["text"] for row in rows}
    assert len(rows) == len(toy.all_scenes()) - 2 * len(toy.HELD_OUT)
    assert not captions & set(toy.HELD_OUT_PROMPTS)
    for row in rows:
        assert (first / row["file_name"]).is_file()
        assert not toy.is_held_out(toy.parse_caption(row["text"]))


def test_held_out_prompts_name_held_out_scenes_and_captions_round_trip() -> None:
    assert all(toy.is_held_out(toy.parse_caption(p)) for p in toy.HELD_OUT_PROMPTS)
    for scene in toy.all_scenes():
        assert toy.parse_caption(scene.caption) == scene


def test_toy_style_id_loads_through_the_datasets_imagefolder_loader(nlora_home: Path) -> None:
    from datasets import load_dataset

    folder = Path(resolve_data(toy.TOY_STYLE_ID))
    assert folder.parent == nlora_home
    assert resolve_data(toy.TOY_STYLE_ID) == str(folder)  # created once, then reused
    data = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(data) == len(toy.all_scenes()) - 2 * len(toy.HELD_OUT)
    assert data[0]["image"].size == (toy.RESOLUTION, toy.RESOLUTION)
    assert toy.parse_caption(data[0]["text"])


def test_other_ids_pass_through_unchanged() -> None:
    assert resolve_data("lambdalabs/naruto-blip-captions") == "lambdalabs/naruto-blip-captions"
    assert resolve_model("stabilityai/stable-diffusion-xl-base-1.0") == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )


def test_toy_base_id_resolves_to_the_committed_model() -> None:
    folder = Path(resolve_model(toy.TOY_BASE_ID))
    assert folder == toy.toy_base_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_missing_toy_base_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from naruto_lora.util.errors import UserError

    monkeypatch.setattr(toy, "toy_base_dir", lambda: tmp_path / "nothing")
    with pytest.raises(UserError, match="toy base model is missing"):
        resolve_model(toy.TOY_BASE_ID)


def test_random_drawings_are_seeded_and_broad() -> None:
    """The VAE's training distribution: reproducible per seed, and far broader than the two data
    sets (many background colours, the style's and the plain look among its neighbours)."""
    import numpy as np

    first = toy.random_drawings(48, seed=3)
    again = toy.random_drawings(48, seed=3)
    other = toy.random_drawings(48, seed=4)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)
    )
    assert not all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other, strict=True)
    )
    assert {im.size for im in first} == {(toy.RESOLUTION, toy.RESOLUTION)}
    corners = {tuple(np.asarray(im)[1, 1] // 32) for im in first}  # background colour bins
    assert len(corners) >= 20
    colours_per_image = [len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) for im in first]
    # A shape may come out in its background's colour now and then, but rarely.
    assert sum(n >= 2 for n in colours_per_image) >= 0.9 * len(first)
