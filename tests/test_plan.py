"""The planner on the tiny model: its prediction on fake tensors against the tracked allocations
of a real run of the same step, the report's arithmetic, --fit's output, and the CLI."""

from __future__ import annotations

import json

import pytest

from naruto_lora.plan.memtrack import GIB
from naruto_lora.plugins.manager import load_profile
from tests.conftest import invoke


@pytest.fixture(scope="module")
def tiny_configs(tiny_model_dir):
    from naruto_lora.plan.models import load_model_configs

    return load_model_configs(load_profile("smoke").model)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # tiny as shipped: text from disk, EMA, validation samples
        ['cache.text="memory"', "cache.latents=false", "train.gradient_accumulation_steps=2"],
    ],
    ids=["shipped", "encoders-and-vae-on-device"],
)
def test_prediction_matches_a_real_run_of_the_same_step(tiny_configs, overrides):
    """Fake tensors (the prediction) and real tensors (the tiny model loaded from its folder,
    really trained for the same steps) give the same tracked peaks and split."""
    from naruto_lora.plan.core import SimTarget
    from naruto_lora.plan.sim import simulate_training

    profile = load_profile("smoke", overrides=overrides)
    predicted = simulate_training(profile, tiny_configs, target=SimTarget("cpu", fake=True))
    measured = simulate_training(profile, tiny_configs, target=SimTarget("cpu", fake=False))
    assert predicted.training.peak_bytes == pytest.approx(measured.training.peak_bytes, rel=0.01)
    assert predicted.training.split.keys() == measured.training.split.keys()
    for label, size in measured.training.split.items():
        assert predicted.training.split[label] == pytest.approx(size, rel=0.01), label
    assert predicted.validation.peak_bytes == pytest.approx(
        measured.validation.peak_bytes, rel=0.01
    )
    assert predicted.flops_per_micro_step == measured.flops_per_micro_step > 0
    if "cache.latents=false" in overrides:
        assert "vae" in measured.training.split and "text_encoders" in measured.training.split


def test_the_planner_builds_and_steps_through_the_trainers_own_functions(tiny_configs, monkeypatch):
    """On fake tensors the planner calls the trainer's ``make_trainable``, ``make_optimizer``,
    ``compute_loss``, ``clip_gradients`` and ``step_optimizer`` (counted through spies): a change
    to training reaches the plan without a second copy to edit."""
    from naruto_lora.plan.core import SimTarget
    from naruto_lora.plan.sim import simulate_training
    from naruto_lora.train import loop, schedule, setup

    calls: dict[str, int] = {}

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module, name in (
        (setup, "make_trainable"),
        (schedule, "make_optimizer"),
        (loop, "compute_loss"),
        (loop, "clip_gradients"),
        (loop, "step_optimizer"),
    ):
        spy(module, name)
    profile = load_profile("smoke")
    simulate_training(profile, tiny_configs, target=SimTarget("cpu", fake=True), validation=False)
    # step_optimizer twice: the optimizer's steady state first, then the traced update
    assert calls == {
        "make_trainable": 1,
        "make_optimizer": 1,
        "compute_loss": 1,
        "clip_gradients": 1,
        "step_optimizer": 2,
    }


def test_state_sizes_follow_from_the_parameter_counts(tiny_configs):
    """fp32 LoRA weights, fp32 gradients, AdamW's two fp32 moments and EMA's fp32 shadow: 4, 4,
    8 and 4 bytes per LoRA parameter (plus the allocator's 512-byte rounding per tensor)."""
    from naruto_lora.plan.sim import simulate_training

    profile = load_profile("smoke", overrides=["train.gradient_accumulation_steps=2"])
    sim = simulate_training(profile, tiny_configs, validation=False)
    split, n = sim.training.split, sim.lora_parameters
    tensors = 2 * 8 * 10  # generous bound on per-tensor rounding: A and B of each target
    for label, per_param in (("lora", 4), ("lora_grads", 4), ("plugin:ema", 4)):
        assert per_param * n <= split[label] <= per_param * n + 512 * tensors * 4, label
    assert 8 * n <= split["optimizer"] <= 8 * n + 512 * tensors * 12
    assert sum(split.values()) == sim.training.peak_bytes


def test_plan_report_arithmetic_and_cache(tiny_configs, tiny_model_dir):
    from naruto_lora.plan.planner import (
        ALLOCATOR_OVERHEAD,
        CUDA_CONTEXT_GIB,
        estimate_peak_vram_gib,
        plan_profile,
    )

    profile = load_profile("smoke")
    plan = plan_profile(profile, sampling=False, use_cache=False)
    peak = plan.run_peak.peak_bytes
    assert plan.run_peak.peak_bytes == max(plan.training.peak_bytes, plan.validation.peak_bytes)
    expected = (peak + int(CUDA_CONTEXT_GIB * GIB + ALLOCATOR_OVERHEAD * peak)) / GIB
    assert plan.need_gib == pytest.approx(expected)
    data = plan.to_dict()
    assert data["prediction"] is True and data["need_gib"] == pytest.approx(plan.need_gib, abs=1e-3)
    # The second time comes from the cache (the same numbers), and doctor's number is the need.
    assert estimate_peak_vram_gib(profile) == pytest.approx(plan.need_gib)


def test_sampling_predictions_low_vram_needs_less(tiny_configs):
    from naruto_lora.plan.pipeline import simulate_sampling

    profile = load_profile("smoke")
    full = simulate_sampling(profile, tiny_configs, low_vram=False)
    low = simulate_sampling(profile, tiny_configs, low_vram=True)
    assert "weights" in full.split and "text_encoders" in full.split
    assert "weights" not in low.split  # streamed from the CPU one layer at a time
    assert low.peak_bytes < full.peak_bytes


def test_fit_output_reproduces_the_configuration(tiny_model_dir, tmp_path):
    """The --set line and the profile file --fit prints both load to the configuration it
    confirmed, and that configuration's confirmed need is within the card."""
    import shlex

    from naruto_lora.config.profile import parse_set
    from naruto_lora.plan.fit import fit_profile, profile_toml, set_line

    profile = load_profile(
        "smoke", overrides=["train.batch_size=2", "train.gradient_accumulation_steps=2"]
    )
    result = fit_profile(profile, 2.0)
    assert result.plan.need_gib <= result.capacity_gib
    assert result.changes  # tiny on 2 GB: room for a faster split of the effective batch
    tokens = shlex.split(set_line(result.changes))
    sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
    assert all(parse_set(s) for s in sets)
    base = ["train.batch_size=2", "train.gradient_accumulation_steps=2"]
    from_line = load_profile("smoke", overrides=base + sets)
    assert from_line.to_dict() | {"name": ""} == result.profile.to_dict() | {"name": ""}
    path = tmp_path / "fitted.toml"
    path.write_text(profile_toml(result, "smoke"))
    from_file = load_profile(str(path))
    for section in ("data", "cache", "lora", "train", "validation"):
        assert from_file.to_dict()[section] == result.profile.to_dict()[section], section
    assert from_file.to_dict()["plugins"] == result.profile.to_dict()["plugins"]


def test_cli_plan_prints_a_prediction_and_checks_a_card(cli_runner, tiny_model_dir):
    result = invoke(cli_runner, ["plan", "--profile", "smoke", "--no-sample", "--vram", "8"])
    assert result.exit_code == 0, result.output
    assert "PREDICTION" in result.output
    assert "fits" in result.output
    result = invoke(cli_runner, ["plan", "--profile", "smoke", "--no-sample", "--json"])
    data = json.loads(result.output)
    assert data["prediction"] is True
    assert data["need_gib"] > data["tracked_peak_gib"] > 0


def test_cli_plan_rejects_nonsense(cli_runner):
    result = invoke(cli_runner, ["plan", "--profile", "smoke", "--save", "x.toml"])
    assert result.exit_code != 0
    assert "--fit" in result.output
    result = invoke(cli_runner, ["plan", "--profile", "smoke", "--vram", "0"])
    assert result.exit_code != 0
    assert "--vram" in result.output


@pytest.mark.slow
def test_full_size_sdxl_plan_on_cpu(monkeypatch, tmp_path):
    """The 8gb recipe on the full-size SDXL architecture: the weights are the published UNet's
    2,567,463,684 parameters in fp16, the LoRA rank 4's parameters in fp32."""
    from naruto_lora.plan.planner import plan_profile

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    plan = plan_profile(load_profile("8gb"), sampling=False, use_cache=False)
    weights = plan.training.split["weights"]
    assert 2 * 2_567_463_684 <= weights <= 2 * 2_567_463_684 * 1.001
    assert plan.lora_parameters == 23_224_320 // 4
    assert plan.training.split["lora"] >= 4 * plan.lora_parameters
    assert "text_encoders" not in plan.training.split  # 8gb caches text on disk
    assert 5 < plan.need_gib < 12
