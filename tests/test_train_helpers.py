"""The small pure pieces beside the training loop, each against an independent reference."""

from __future__ import annotations

import math
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from naruto_lora.config.profile import write_resolved
from naruto_lora.data.preprocess import time_ids as sdxl_time_ids
from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.train.guard import NonFiniteGuard, explain_out_of_memory, stop_on_signals
from naruto_lora.train.metrics import MetricsLog, SmoothedValue, plot_loss, read_metrics
from naruto_lora.train.objective import (
    batch_time_ids,
    combine_loss_weights,
    per_sample_mse,
    prediction_target,
    weighted_loss,
)
from naruto_lora.train.outputs import check_output_folder
from naruto_lora.train.rng import capture_rng, restore_rng
from naruto_lora.train.schedule import make_lr_scheduler, make_optimizer, plan_total_steps
from naruto_lora.util.errors import UserError

# --------------------------------------------------------------------------- schedule


def test_total_steps_bounded_by_max_steps_and_epochs() -> None:
    assert plan_total_steps(max_steps=100, epochs=10, batches_per_epoch=9, accumulation=4) == 22
    assert plan_total_steps(max_steps=5, epochs=10, batches_per_epoch=9, accumulation=4) == 5
    assert plan_total_steps(max_steps=100, epochs=1, batches_per_epoch=8, accumulation=1) == 8
    with pytest.raises(UserError, match="fewer than one optimizer update"):
        plan_total_steps(max_steps=100, epochs=1, batches_per_epoch=3, accumulation=4)


def lr_curve(scheduler_name: str, base: float, warmup: int, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=base)
    cfg = load_profile(
        "smoke",
        overrides=[f'train.lr_scheduler="{scheduler_name}"', f"train.lr_warmup_steps={warmup}"],
    ).train
    scheduler = make_lr_scheduler(optimizer, cfg, total)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_schedule_with_warmup_matches_its_formula() -> None:
    base, warmup, total = 1e-3, 4, 20
    expected = [
        base * s / warmup
        if s < warmup
        else base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    assert lr_curve("cosine", base, warmup, total) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_constant_schedule_and_warmup_longer_than_the_run() -> None:
    assert lr_curve("constant", 5e-4, 3, 6) == [5e-4] * 6
    # Warm-up is clipped to the run: the last step still gets (almost) the full rate.
    curve = lr_curve("constant_with_warmup", 1e-3, 50, 5)
    assert curve == pytest.approx([1e-3 * s / 5 for s in range(5)])


def test_optimizer_choice_and_8bit_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    profile = load_profile("smoke")
    adamw = make_optimizer(build_plugin_manager(profile), params, profile, torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and not adamw.defaults.get("fused")
    assert adamw.defaults["lr"] == profile.train.learning_rate
    eight = load_profile("smoke", enable=["adamw8bit"])
    pm8 = build_plugin_manager(eight)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        make_optimizer(pm8, params, eight, torch.device("cpu"))
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails
    with pytest.raises(UserError, match="needs bitsandbytes"):
        make_optimizer(pm8, params, eight, torch.device("cuda"))


# --------------------------------------------------------------------------- objective


def scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def test_prediction_target_epsilon_and_v() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    assert prediction_target(scheduler("epsilon"), latents, noise, t) is noise
    # v = sqrt(abar) * eps - sqrt(1 - abar) * x0 (Salimans & Ho 2022), abar computed from scratch.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = torch.from_numpy(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    got = prediction_target(scheduler("v_prediction"), latents, noise, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        prediction_target(scheduler("sample"), latents, noise, t)


def test_loss_is_mse_and_weights_multiply() -> None:
    g = torch.Generator().manual_seed(1)
    prediction = torch.randn(4, 4, 5, 5, generator=g).half()
    target = torch.randn(4, 4, 5, 5, generator=g)
    per_sample = per_sample_mse(prediction, target)
    assert per_sample.dtype == torch.float32 and per_sample.shape == (4,)
    reference = torch.nn.functional.mse_loss(prediction.float(), target, reduction="mean")
    torch.testing.assert_close(weighted_loss(per_sample, None), reference)
    a, b = torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.tensor([2.0, 2.0, 0.5, 3.0])
    weights = combine_loss_weights([a, None, b], batch_size=4)
    torch.testing.assert_close(weights, a * b)
    assert combine_loss_weights([None, None], batch_size=4) is None
    torch.testing.assert_close(weighted_loss(per_sample, weights), (per_sample * a * b).sum() / 4)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        combine_loss_weights([torch.ones(3)], batch_size=4)


def test_time_ids_match_the_sdxl_pipeline() -> None:
    from diffusers import StableDiffusionXLPipeline

    unet = SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=8),
        add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=6 * 8 + 40)),
    )
    fake_pipe = SimpleNamespace(unet=unet)
    expected = StableDiffusionXLPipeline._get_add_time_ids(
        fake_pipe, (96, 64), (3, 7), (64, 64), torch.float32, text_encoder_projection_dim=40
    )
    ours = sdxl_time_ids((96, 64), (3, 7), (64, 64))
    torch.testing.assert_close(ours.unsqueeze(0), expected)
    batch = torch.stack([ours, ours])
    assert batch_time_ids(batch, torch.device("cpu"), torch.float16).dtype == torch.float16
    with pytest.raises(ValueError):
        batch_time_ids(ours, torch.device("cpu"), torch.float32)


# --------------------------------------------------------------------------- guards


def test_nonfinite_guard_counts_and_stops_with_advice() -> None:
    guard = NonFiniteGuard(max_in_row=3, learning_rate=1e-2)
    guard.skipped(5, "the loss", ["#1 'a'"])
    guard.ok()
    guard.skipped(7, "the loss", ["#2 'b'"])
    guard.skipped(7, "the loss", ["#3 'c'"])
    assert (guard.in_row, guard.total) == (2, 3)
    with pytest.raises(UserError) as err:
        guard.skipped(7, "the gradient norm", ["#4 'd'"])
    text = str(err.value)
    assert "3 optimizer updates in a row" in text and "#4 'd'" in text
    assert "fp16-fix" in text and "bf16" in text and "learning_rate = 0.01" in text
    restored = NonFiniteGuard(3, 1e-2)
    restored.load_state_dict(guard.state_dict())
    assert (restored.in_row, restored.total) == (guard.in_row, guard.total)


def test_out_of_memory_becomes_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 11.5 * 2**30)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=12 * 2**30)
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    profile = load_profile("14gb", disable=["gradient_checkpointing"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(UserError) as err, explain_out_of_memory(profile):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    text = str(err.value)
    assert "peak allocated 11.50 GiB of 12.0 GiB" in text
    assert "--profile 12gb" in text and "--enable gradient_checkpointing" in text
    assert "cache.text='disk'" in text and "data.resolution" in text


def test_sigterm_sets_the_stop_request_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- metrics, rng


def test_smoothed_value_is_bias_corrected() -> None:
    smooth = SmoothedValue(0.9)
    assert math.isnan(smooth.value)
    assert smooth.update(2.0) == pytest.approx(2.0)  # not 0.2
    values = [2.0, 4.0, 3.0]
    smooth = SmoothedValue(0.5)
    for v in values:
        smooth.update(v)
    weights = [0.25, 0.5, 1.0]  # 0.5^(n-1-i), normalised
    expected = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    assert smooth.value == pytest.approx(expected)


def test_metrics_truncate_on_resume_and_plot(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    png = plot_loss(log.path, tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss(tmp_path / "none.jsonl", tmp_path / "x.png") is None


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    torch.save(capture_rng(generator), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), generator)
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


# --------------------------------------------------------------------------- output folder


def test_output_folder_rules(tmp_path: Path) -> None:
    profile = load_profile("smoke", overrides=["lora.rank=4"])
    assert check_output_folder(tmp_path / "new", profile, None) is False
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")
    assert check_output_folder(empty, profile, None) is False
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a naruto-lora training output"):
        check_output_folder(stranger, profile, None)

    run = tmp_path / "run"
    run.mkdir()
    write_resolved(profile, run / "profile.toml")
    other = load_profile("smoke", overrides=["lora.rank=8", 'model.pretrained="/models/other"'])
    with pytest.raises(UserError) as err:
        check_output_folder(run, other, "latest")
    assert "lora.rank: 4 there, 8 now" in str(err.value)
    assert "model.pretrained" in str(err.value)
    # Same identity: a learning-rate change is still the same run.
    same = load_profile(
        "smoke", overrides=["lora.rank=4", "train.learning_rate=0.01", "train.max_steps=99"]
    )
    assert check_output_folder(run, same, None) is True  # no checkpoints yet: start over
    (run / "checkpoints" / "step-20").mkdir(parents=True)
    with pytest.raises(UserError, match="unfinished run"):
        check_output_folder(run, same, None)
    assert check_output_folder(run, same, "latest") is False
    assert check_output_folder(run, same, None, overwrite=True) is True
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")  # a finished run: kept
    with pytest.raises(UserError, match="finished run"):
        check_output_folder(run, same, None)
    assert check_output_folder(run, same, None, overwrite=True) is True
    assert check_output_folder(run, other, None, overwrite=True) is True  # replaced on request
    with pytest.raises(UserError, match="give one of them"):
        check_output_folder(run, same, "latest", overwrite=True)
    with pytest.raises(UserError, match="not a naruto-lora training output"):
        check_output_folder(stranger, profile, None, overwrite=True)


def test_live_display_shows_progress_and_vital_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from naruto_lora.train.display import TrainDisplay

    monkeypatch.setenv("NLORA_NO_PROGRESS", "0")
    display = TrainDisplay(total_steps=10, start_step=2, memory_kind="VRAM")
    with display:
        display.update(step=3, epoch=0, loss=0.12345, lr=2.5e-4, peak_gib=7.25)
        console = Console(record=True, width=80, force_terminal=False)
        console.print(display._progress.get_renderable())
    text = console.export_text()
    assert "3/10" in text and "step/s" in text and "ETA" in text
    assert "loss 0.1235" in text and "lr 2.50e-04" in text and "peak VRAM 7.25 GiB" in text
    assert "epoch 1" in text
