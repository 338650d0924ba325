"""``nlora sample`` on the tiny model: deterministic per seed, scale 0 is the base pipeline's image,
scale 1 matches diffusers' own load + fuse, ``--ema`` uses the EMA weights, kohya files load,
``--compare`` writes one labelled grid per prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naruto_lora.lora.inject import WEIGHT_NAME
from tests.conftest import invoke
from tests.lora_factory import make_output

STEPS = "2"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "naruto-tiny"
    make_output(folder, tiny_model_dir, rank=4, alpha=2.0, ema=True)
    return folder


def sample_cli(cli_runner, run: Path, out: Path, *args: str):
    result = invoke(cli_runner, ["sample", "--lora", str(run), "--prompt", "a red circle",
                                 "--steps", STEPS, "--seed", "3", "--out", str(out), *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def diffusers_image(model_dir: Path, lora: Path | None = None, seed: int = 3) -> np.ndarray:
    """The reference: diffusers' pipeline, the LoRA loaded and fused the documented way."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    image = pipe("a red circle", num_inference_steps=int(STEPS), guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def base_image(tiny_model_dir) -> np.ndarray:
    return diffusers_image(tiny_model_dir)


def test_same_seed_same_image_and_metadata(run, tmp_path, cli_runner):
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    sample_cli(cli_runner, run, first)
    sample_cli(cli_runner, run, second)
    result = invoke(cli_runner, ["sample", "--lora", str(run), "--prompt", "a red circle",
                                 "--steps", STEPS, "--seed", "4", "--out", str(other)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))
    text = Image.open(first).text
    assert text["prompt"] == "a red circle" and text["seed"] == "3" and text["lora_scale"] == "1.0"
    assert text["lora"] == str(run / WEIGHT_NAME) and text["size"] == "64x64"
    assert "Seed: 3" in text["parameters"]


def test_scale_zero_is_the_base_pipeline(run, tmp_path, cli_runner, base_image):
    sample_cli(cli_runner, run, tmp_path / "zero.png", "--scale", "0")
    assert np.array_equal(pixels(tmp_path / "zero.png"), base_image)


def test_scale_one_matches_diffusers_load_and_fuse(
    run, tmp_path, cli_runner, tiny_model_dir, base_image
):
    sample_cli(cli_runner, run, tmp_path / "one.png")
    ours, reference = pixels(tmp_path / "one.png"), diffusers_image(tiny_model_dir, run)
    assert np.abs(ours - reference).max() <= 2  # same weights; fusing order may round differently
    assert np.abs(ours - base_image).mean() > 5  # and the LoRA visibly matters


def test_ema_uses_the_ema_weights(run, tmp_path, cli_runner, tiny_model_dir):
    sample_cli(cli_runner, run, tmp_path / "ema.png", "--ema")
    sample_cli(cli_runner, run, tmp_path / "main.png")
    ema, main = pixels(tmp_path / "ema.png"), pixels(tmp_path / "main.png")
    reference = diffusers_image(tiny_model_dir, run / "ema_unet")
    assert np.abs(ema - reference).max() <= 2
    assert np.abs(ema - main).mean() > 1
    assert Image.open(tmp_path / "ema.png").text["lora"].endswith(f"ema_unet/{WEIGHT_NAME}")


def test_ema_missing_is_a_clear_error(tmp_path, cli_runner, tiny_model_dir):
    make_output(tmp_path / "no-ema", tiny_model_dir)
    result = invoke(cli_runner, ["sample", "--lora", str(tmp_path / "no-ema"), "--ema", "--out",
                                 str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 2 and "no EMA weights" in result.output
    assert not (tmp_path / "x.png").exists()


def test_kohya_file_samples_like_the_training_output(run, tmp_path, cli_runner, tiny_model_dir):
    from naruto_lora.export.writers import export_lora
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(str(run / "profile.toml"))
    kohya = export_lora(lora_file=run / WEIGHT_NAME, fmt="kohya", out=tmp_path / "k.safetensors",
                        model_cfg=profile.model, dtype_name="fp32").path  # fmt: skip
    result = invoke(cli_runner, ["sample", "--lora", str(kohya), "--model", str(tiny_model_dir), "--vae", "",
                                 "--prompt", "a red circle", "--steps", STEPS, "--seed", "3",
                                 "--out", str(tmp_path / "k.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    sample_cli(cli_runner, run, tmp_path / "d.png")
    assert np.abs(pixels(tmp_path / "k.png") - pixels(tmp_path / "d.png")).max() <= 2


def test_compare_writes_one_labelled_grid_per_prompt(run, tmp_path, cli_runner, base_image):
    out = tmp_path / "grids"
    result = invoke(cli_runner, ["sample", "--lora", str(run), "--compare", "--scales", "0,1",
                                 "--prompt", "a red circle", "--prompt", "a blue square",
                                 "--steps", STEPS, "--seed", "3", "--num-images", "2",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    grids = sorted(out.iterdir())
    assert [p.name for p in grids] == [
        "compare-00-a-red-circle.png",
        "compare-01-a-blue-square.png",
    ]
    grid = Image.open(grids[0])
    text = grid.text
    assert (text["prompt"], text["lora_scale"], text["seeds"]) == ("a red circle", "0,1", "3,4")
    boxes = json.loads(text["grid_cells"])
    assert len(boxes) == 2 and all(len(row) == 2 for row in boxes)  # rows: seeds, columns: scales
    cells = np.asarray(grid.convert("RGB"), dtype=np.int16)
    crop = [[cells[b[1] : b[3], b[0] : b[2]] for b in row] for row in boxes]
    assert crop[0][0].shape == (64, 64, 3)
    assert np.array_equal(crop[0][0], base_image)  # seed 3, scale 0: the base model exactly
    single = tmp_path / "single.png"
    sample_cli(cli_runner, run, single)  # seed 3, LoRA fused at 1
    assert np.abs(crop[0][1] - pixels(single)).max() <= 2
    assert not np.array_equal(crop[1][0], crop[0][0])  # the second row has the next seed
    # Labels: dark text above the cells and left of them on the white background.
    header = cells[: boxes[0][0][1], :]
    left = cells[:, : boxes[0][0][0]]
    assert (header < 128).any() and (left < 128).any()


def test_scheduler_low_vram_and_prompts_file(run, tmp_path, cli_runner):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red circle\n\na green star\n")
    out = tmp_path / "many"
    result = invoke(cli_runner, ["sample", "--lora", str(run), "--prompts", str(prompts), "--steps", STEPS,
                                 "--scheduler", "euler-a", "--low-vram", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert [Image.open(p).text["prompt"] for p in files] == ["a red circle", "a green star"]
    assert Image.open(files[0]).text["scheduler"] == "euler-a"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scales", "0,strong", "--compare"], "--scales"),
        (["--num-images", "2", "--out", "one.png"], "names one file"),
        (["--prompts", "missing.txt"], "Cannot read --prompts"),
        (["--height", "60"], "multiple of 8"),
    ],
)
def test_bad_options_are_clear_errors(args, message, run, tmp_path, cli_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(cli_runner, ["sample", "--lora", str(run), "--prompt", "x", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (run / "samples").exists() and not (tmp_path / "one.png").exists()
