"""Exact resume, the signal-triggered checkpoint, the non-finite guard and the hook order."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME
from naruto_lora.plugins import hookspecs
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.metrics import read_metrics
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.train_support import (
    ALL_PLUGINS,
    NaNLossWeights,
    SignalAt,
    cli_args,
    plugin_manager,
    tiny_profile,
)

# Batch 2 over 8 items = 4 batches per epoch, 3 per update: accumulation windows cross epochs.
RESUME_SETS = (
    "train.batch_size=2",
    "train.gradient_accumulation_steps=3",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.lr_warmup_steps=2",
    'train.lr_scheduler="cosine"',
    "validation.every_steps=2",
    "lora.dropout=0.1",  # draws from the global torch generator: its state must resume too
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume-cache")


class HookRecorder:
    """Every hook call, in order, through pluggy's call monitoring."""

    def __init__(self, pm) -> None:
        self.calls: list[str] = []
        pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: self.calls.append(name), lambda *a: None
        )

    def first_calls(self) -> list[str]:
        seen: list[str] = []
        for name in self.calls:
            if name not in seen:
                seen.append(name)
        return seen


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "raw": load_file(str(out / WEIGHT_NAME)),
        "ema": load_file(str(out / EMA_SUBFOLDER / WEIGHT_NAME)),
    }


def test_stop_and_resume_equals_one_run_bit_for_bit(cache_dir: Path, tmp_path: Path) -> None:
    one = tiny_profile(cache_dir, tmp_path / "one", *RESUME_SETS, enable=ALL_PLUGINS)
    whole = train(one, TrainOptions(device="cpu"))
    assert (whole.global_step, whole.interrupted) == (4, None)

    two = tiny_profile(cache_dir, tmp_path / "two", *RESUME_SETS, enable=ALL_PLUGINS)
    first = train(two, TrainOptions(device="cpu"), pm=plugin_manager(two, SignalAt(2)))
    assert first.interrupted == "SIGTERM" and first.global_step == 2
    assert first.checkpoint == tmp_path / "two" / "checkpoints" / "step-2"
    assert not (tmp_path / "two" / WEIGHT_NAME).exists()  # stopped, not finished

    pm = plugin_manager(two)
    recorder = HookRecorder(pm)
    second = train(two, TrainOptions(device="cpu", resume="latest"), pm=pm)
    assert (second.global_step, second.interrupted) == (4, None)
    called = recorder.first_calls()
    assert called[:6] == [
        "nlora_prepare_unet",
        "nlora_prepare_validation_vae",
        "nlora_build_optimizer",
        "nlora_wrap_model",
        "nlora_train_start",
        "nlora_load_checkpoint_state",
    ]
    assert called == [h for h in hookspecs.LIFECYCLE if h in called]

    expected, got = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for kind in ("raw", "ema"):
        assert expected[kind].keys() == got[kind].keys()
        for key, value in expected[kind].items():
            assert torch.equal(got[kind][key], value), (kind, key)
    rows_one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    rows_two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert (a["step"], a["epoch"], a["loss"], a["lr"]) == (
            b["step"],
            b["epoch"],
            b["loss"],
            b["lr"],
        )
    # 4 updates x 3 micro-batches = 12 batches = 3 epochs of 4: the last update is in epoch 2.
    assert [r["epoch"] for r in rows_two] == [0, 1, 2, 2]
    assert whole.epoch == second.epoch == 2
    assert whole.final_loss == second.final_loss  # the smoothed loss resumes too
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == [
        "step-2.png",
        "step-4.png",
    ]


def test_resume_from_another_runs_checkpoint_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    first = tiny_profile(
        cache_dir, tmp_path / "a", "train.checkpoint_every=2", "train.max_steps=2", only=[]
    )
    train(first, TrainOptions(device="cpu"))
    other = tiny_profile(cache_dir, tmp_path / "b", "lora.rank=2", only=[])
    with pytest.raises(UserError, match="lora.rank: 4 there, 2 now"):
        train(
            other, TrainOptions(device="cpu", resume=str(tmp_path / "a" / "checkpoints" / "step-2"))
        )


def test_ctrl_c_through_the_cli_checkpoints_and_says_how_to_resume(
    cli_runner, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import naruto_lora.plugins.manager as plugins

    out = tmp_path / "cli"
    build = plugins.build_plugin_manager

    def with_ctrl_c(profile, plugin_classes=None):
        pm = build(profile, plugin_classes)
        pm.register(SignalAt(2, signal.SIGINT), name="ctrl-c")
        return pm

    monkeypatch.setattr(plugins, "build_plugin_manager", with_ctrl_c)
    result = invoke(cli_runner, cli_args(cache_dir, out, "train.max_steps=3"))
    assert result.exit_code == 128 + signal.SIGINT, result.output
    assert "Stopped by SIGINT at step 2" in result.output and "--resume latest" in result.output
    assert (out / "checkpoints" / "step-2" / "training_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back

    monkeypatch.setattr(plugins, "build_plugin_manager", build)
    again = invoke(cli_runner, cli_args(cache_dir, out, "train.max_steps=3"))
    assert (
        again.exit_code == 2 and "--resume latest" in again.output
    )  # unfinished: not silently lost
    resumed = invoke(
        cli_runner, [*cli_args(cache_dir, out, "train.max_steps=3"), "--resume", "latest"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_nonfinite_loss_skips_one_update_and_names_the_items(
    cache_dir: Path, tmp_path: Path, capsys
) -> None:
    profile = tiny_profile(cache_dir, tmp_path / "nan", "train.max_steps=3", only=[])
    nan = NaNLossWeights(bad_calls={2})
    result = train(profile, TrainOptions(device="cpu"), pm=plugin_manager(profile, nan))
    assert result.global_step == 3 and nan.calls == 4  # one window spent on the skipped update
    assert [r["step"] for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "the loss is not finite; update skipped (1 in a row, 1 in all)" in err
    assert "naruto style" in err and "#" in err  # the batch's items by index and caption


def test_nonfinite_losses_in_a_row_stop_with_advice(cache_dir: Path, tmp_path: Path) -> None:
    profile = tiny_profile(
        cache_dir, tmp_path / "nan", "train.max_nonfinite_in_row=2", "train.max_steps=5", only=[]
    )
    pm = plugin_manager(profile, NaNLossWeights(always=True))
    with pytest.raises(UserError) as err:
        train(profile, TrainOptions(device="cpu"), pm=pm)
    text = str(err.value)
    assert "not finite for 2 optimizer updates in a row" in text
    assert "fp16-fix" in text and "bf16" in text and "learning_rate" in text
    assert read_metrics(tmp_path / "nan" / "metrics.jsonl") == []


def test_hook_order_with_every_plugin_is_the_documented_lifecycle(
    cache_dir: Path, tmp_path: Path
) -> None:
    profile = tiny_profile(
        cache_dir,
        tmp_path / "hooks",
        "train.max_steps=2",
        "train.gradient_accumulation_steps=2",
        "validation.every_steps=2",
        "train.checkpoint_every=2",
        enable=ALL_PLUGINS,
    )
    pm = plugin_manager(profile)
    recorder = HookRecorder(pm)
    train(profile, TrainOptions(device="cpu"), pm=pm)
    called = recorder.first_calls()
    assert called == [h for h in hookspecs.LIFECYCLE if h in called]
    assert set(called) == set(hookspecs.LIFECYCLE) - {
        "nlora_doctor_checks",
        "nlora_load_checkpoint_state",
    }
    # Per optimizer step: (noise, timesteps, loss weights) for each of the 2 micro-batches.
    step_calls = [
        c
        for c in recorder.calls
        if c
        in {
            "nlora_sample_noise",
            "nlora_sample_timesteps",
            "nlora_loss_weights",
            "nlora_after_optimizer_step",
        }
    ]
    micro = ["nlora_sample_noise", "nlora_sample_timesteps", "nlora_loss_weights"]
    assert step_calls == (micro * 2 + ["nlora_after_optimizer_step"]) * 2
    # The end: checkpoint state, its weights, then train_end and the final weights.
    assert recorder.calls[-4:] == [
        "nlora_checkpoint_state",
        "nlora_lora_weights_to_save",
        "nlora_train_end",
        "nlora_lora_weights_to_save",
    ]
