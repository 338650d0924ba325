"""Data sources a user gets slightly wrong: captions that are not UTF-8, tiny images, a relative
folder that is not there, a folder of captions only. Each says what it found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from naruto_lora.data.sources import scan_source
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.test_data import data_cfg, noise_image


def cache_latents(cli_runner, data: str, tmp_path: Path):
    return invoke(cli_runner, ["cache", "latents", "--profile", "smoke", "--data", data,
                               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # fmt: skip


def test_latin1_captions_are_read_as_latin1_with_a_warning(tmp_path: Path) -> None:
    noise_image(16, 16).save(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("un café à Paris".encode("latin-1"))
    noise_image(16, 16).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("plain", encoding="utf-8")
    scan = scan_source(data_cfg(str(tmp_path)))
    captions = {i.key: i.caption for i in scan.items}
    assert captions == {"cafe.png": "un café à Paris", "ok.png": "plain"}
    assert any("not UTF-8" in w and "cafe.txt" in w and "ok.txt" not in w for w in scan.warnings)


def test_a_latin1_metadata_file_is_read_with_a_warning(tmp_path: Path) -> None:
    noise_image(16, 16).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        '{"file_name": "a.png", "text": "naïve"}\n'.encode("latin-1")
    )
    scan = scan_source(data_cfg(str(tmp_path)))
    assert scan.items[0].caption == "naïve"
    assert any("metadata.jsonl" in w and "Latin-1" in w for w in scan.warnings)


def test_tiny_images_are_named_in_a_warning(cli_runner, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (1, 1), (200, 0, 0)).save(data / "dot.png")
    noise_image(64, 64).save(data / "fine.png")
    for name in ("dot", "fine"):
        (data / f"{name}.txt").write_text(name)
    result = cache_latents(cli_runner, str(data), tmp_path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "upscaled more than 4x" in text and "dot.png (1x1 px, 64x)" in text
    assert "fine.png" not in text.split("upscaled")[1]


def test_a_missing_relative_folder_is_reported_as_a_folder(
    cli_runner, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = cache_latents(cli_runner, "datasets/nope", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "is not a local folder" in text and str(tmp_path / "datasets" / "nope") in text
    result = cache_latents(cli_runner, "data/sets/nope", tmp_path)  # cannot be a hub id
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Data folder 'data/sets/nope' does not exist" in text


def test_a_folder_of_captions_only_says_it_has_no_images(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("a caption")
    with pytest.raises(UserError, match=r"has no images: it holds 2 file\(s\) \(\.txt\)") as caught:
        scan_source(data_cfg(str(tmp_path)))
    assert "cat.png + cat.txt" in str(caught.value) and "column" not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
