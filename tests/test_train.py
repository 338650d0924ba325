"""``nlora train`` end to end on the tiny model: outputs that diffusers' own loader takes, a LoRA
that lowers the denoising loss, and clear errors before any training for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME
from naruto_lora.plugins.manager import load_profile
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.metrics import METRIC_FIELDS, read_metrics
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.train_support import (
    ALL_PLUGINS,
    cli_args,
    load_with_diffusers,
    lora_problems,
    tiny_profile,
    unet_inputs,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def test_cli_all_plugins_end_to_end(
    cli_runner, tiny_model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    args = cli_args(cache_dir, out, "validation.every_steps=2", "train.checkpoint_every=2")
    for name in ALL_PLUGINS:
        args += ["--enable", name]
    result = invoke(cli_runner, args)
    assert result.exit_code == 0, result.output
    assert "Trained 4 steps" in result.output

    for folder in (out, out / EMA_SUBFOLDER):
        assert (folder / WEIGHT_NAME).is_file()
        pipe, reports = load_with_diffusers(tiny_model_dir, folder, monkeypatch)
        assert reports and lora_problems(reports) == []
    meta = metadata(out / WEIGHT_NAME)
    assert meta["base_model"] == "nlora:tiny" and meta["profile"] == "smoke"
    assert (meta["rank"], meta["alpha"], meta["resolution"], meta["steps"]) == ("4", "4", "64", "4")

    resolved = load_profile(str(out / "profile.toml"))
    assert set(resolved.enabled_plugins()) == set(ALL_PLUGINS)
    assert resolved.train.max_steps == 4
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(METRIC_FIELDS) <= set(r) for r in rows)
    assert all(r["peak_mem_gib"] > 0 and r["step_s"] > 0 for r in rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    card = (out / "README.md").read_text()
    assert "nlora:tiny" in card and "samples/step-4.png" in card and "load_lora_weights" in card
    assert "ema_unet" in card and "rank 4, alpha 4" in card


def test_cli_no_plugins_alpha_round_trips_and_changes_the_unet(
    cli_runner, tiny_model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """No plugins, text encoded on the fly, latents from the VAE on the fly, alpha != rank."""
    out = tmp_path / "plain"
    args = cli_args(cache_dir, out, "lora.alpha=8", 'cache.text="memory"', "cache.latents=false")
    for name in ALL_PLUGINS:
        args += ["--disable", name]
    result = invoke(cli_runner, args)
    assert result.exit_code == 0, result.output
    assert not (out / EMA_SUBFOLDER).exists()
    assert not (out / "samples").exists()

    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    pipe, reports = load_with_diffusers(tiny_model_dir, out, monkeypatch)
    assert lora_problems(reports) == []
    (adapter,) = pipe.unet.peft_config
    assert (pipe.unet.peft_config[adapter].r, pipe.unet.peft_config[adapter].lora_alpha) == (4, 8)

    # One target layer by hand: W x + (alpha / r) * B A x, with A and B read from the file.
    with safe_open(str(out / WEIGHT_NAME), framework="pt") as fh:
        prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        lora_a, lora_b = (
            fh.get_tensor(f"{prefix}.lora_A.weight"),
            fh.get_tensor(f"{prefix}.lora_B.weight"),
        )
    assert lora_b.abs().sum() > 0  # peft initialises B to zero: training moved it
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    base_layer = base.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(3, base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base_layer(x) + (8 / 4) * (x @ lora_a.T @ lora_b.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        inputs = unet_inputs()
        assert not torch.allclose(pipe.unet(**inputs).sample, base(**inputs).sample)


def conditionings(profile, tiny_cache_profile):
    """Every item of the data set as one batch, through the trainer's own conditioning."""
    from naruto_lora.cache import (
        build_train_dataset,
        collate,
        ensure_latent_cache,
        ensure_text_cache,
    )
    from naruto_lora.train.conditioning import Conditioner

    latents = ensure_latent_cache(tiny_cache_profile, auto=False)
    text = ensure_text_cache(tiny_cache_profile, auto=False)
    dataset = build_train_dataset(tiny_cache_profile, latents, text)
    batch = collate([dataset[i] for i in range(len(dataset))])
    return [Conditioner(torch.device("cpu"), torch.float32)(batch)]


def test_training_lowers_the_denoising_loss(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Measured on the training data with fixed noise and timesteps of its own (not the
    training streams): the trained LoRA beats the base model."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.models.loading import load_noise_scheduler
    from naruto_lora.train.evaluate import denoising_loss

    profile = tiny_profile(
        cache_dir,
        tmp_path / "quality",
        "train.max_steps=12",
        'train.lr_scheduler="constant"',
        "train.learning_rate=0.01",
        only=[],
    )
    result = train(profile, TrainOptions(device="cpu"))
    assert result.global_step == 12
    batches = conditionings(profile, profile)
    scheduler = load_noise_scheduler(profile.model)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    pipe, _ = load_with_diffusers(tiny_model_dir, result.output_dir, monkeypatch)
    base_loss = denoising_loss(base, batches, scheduler, seed=99)
    lora_loss = denoising_loss(pipe.unet, batches, scheduler, seed=99)
    assert denoising_loss(base, batches, scheduler, seed=99) == base_loss  # truly fixed
    # Deterministic inputs, so any drop is real; 5% keeps it clear of rounding.
    assert lora_loss < 0.95 * base_loss, (lora_loss, base_loss)


# --------------------------------------------------------------------------- errors before training


def assert_nothing_trained(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_unknown_target_module_fails_before_caches_and_training(cli_runner, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "fresh-cache"
    result = invoke(cli_runner, cli_args(cache, out, 'lora.target_modules=["to_q", "to_qkv"]'))
    assert result.exit_code == 2
    assert "to_qkv" in result.output and "Traceback" not in result.output
    assert_nothing_trained(out)
    assert not cache.exists()  # checked before any cache was built


def test_output_folder_of_another_run_is_refused(cli_runner, cache_dir: Path, tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    other = load_profile("smoke", overrides=["lora.rank=16"])
    (out / "profile.toml").write_text(other.to_toml())
    result = invoke(cli_runner, cli_args(cache_dir, out))
    assert result.exit_code == 2
    assert "holds another run" in result.output and "lora.rank: 16 there, 4 now" in result.output
    assert_nothing_trained(out)


def test_no_auto_cache_requires_ready_caches(cli_runner, tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "empty-cache"
    result = invoke(cli_runner, [*cli_args(cache, out), "--no-auto-cache"])
    assert result.exit_code == 2, result.output
    assert "nlora cache latents" in result.output
    assert not out.exists()  # a failed setup does not claim the output folder


def test_tensorboard_without_the_package_is_a_clear_error(
    cli_runner, tmp_path: Path, monkeypatch
) -> None:
    import importlib.util

    import accelerate.tracking  # noqa: F401 - imported before the patch: it probes trackers once

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a)
    )
    result = invoke(cli_runner, [*cli_args(tmp_path / "c", tmp_path / "o"), "--tensorboard"])
    assert result.exit_code == 2 and "pip install" in result.output


def test_resume_latest_without_checkpoints(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no checkpoints"):
        train(
            tiny_profile(cache_dir, tmp_path / "none"), TrainOptions(device="cpu", resume="latest")
        )


def test_metrics_per_step_and_only_the_newest_checkpoints_kept(cache_dir: Path, tmp_path: Path):
    sets = ("train.max_steps=3", "train.checkpoint_every=1", "train.checkpoints_keep=2")
    result = train(
        tiny_profile(cache_dir, tmp_path / "m", *sets, only=[]), TrainOptions(device="cpu")
    )
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    kept = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert kept == ["step-2", "step-3"] and result.checkpoint.name == "step-3"


def test_tensorboard_logs_every_step(cache_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    profile = tiny_profile(cache_dir, tmp_path / "tb", "train.max_steps=2", only=[])
    train(profile, TrainOptions(device="cpu", tensorboard=True))
    # accelerate's tracker writes the scalars to logs/<project>/ (hparams go to a subfolder).
    accumulator = EventAccumulator(str(tmp_path / "tb" / "logs" / "nlora"))
    accumulator.Reload()
    assert {"loss", "lr", "grad_norm", "peak_mem_gib"} <= set(accumulator.Tags()["scalars"])
    assert [s.step for s in accumulator.Scalars("loss")] == [1, 2]
