"""The training benchmark's loops still run against the training code (no timing is asserted:
benchmarks print numbers, tests only check that they can)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_train

        yield bench_train
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("loop", ["ours", "reference"])
def test_benchmark_loops_run_on_the_tiny_model(
    bench, loop, tmp_path, tiny_model_dir, tiny_data_dir
):
    from naruto_lora.plugins.manager import load_profile

    overrides = bench.run_overrides(tmp_path, loop, 2) + ["data.max_items=8"]
    profile = load_profile("smoke", overrides=overrides)
    if loop == "ours":
        result = bench.time_our_loop(profile, "cpu", updates=1, warmup=1)
    else:
        result = bench.time_reference_loop(profile, "cpu", updates=1, warmup=1)
    phases = sum(result[p] for p in bench.PHASES)
    assert result["step_s"] == pytest.approx(phases)
    assert result["forward_s"] > 0 and result["backward_s"] > 0
    assert result["images_per_s"] == pytest.approx(4 / result["step_s"])
    assert result["kind"] == "rss" and result["peak_gib"] > 0
    assert result["skipped_updates"] == 0


def test_every_speed_variant_is_a_profile_setting(bench) -> None:
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile("smoke", overrides=bench.with_variants([], list(bench.VARIANTS)))
    assert {"compile", "channels_last", "tf32"} <= set(profile.enabled_plugins())
    assert profile.train.mixed_precision == "bf16"
