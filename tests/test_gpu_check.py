"""benchmarks/gpu_check.py: its CPU smoke mode runs every case the CPU can on the tiny model
(CI runs it, so the GPU check cannot rot before a GPU appears); on a CUDA GPU a short run of the
real thing. No timing is asserted: benchmarks print numbers, tests check that they can."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def smoke(gpu_check, tiny_model_dir, tmp_path_factory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    status = gpu_check.main(["--cpu-smoke", "--out", str(out)])
    report = json.loads((out / gpu_check.JSON_NAME).read_text())
    return status, report, (out / gpu_check.MARKDOWN_NAME).read_text()


def entries(report: dict) -> dict[str, dict]:
    return {e["case"]["label"]: e for e in report["cases"]}


def test_smoke_runs_every_profile_with_the_planner_beside_it(smoke) -> None:
    status, report, _ = smoke
    assert status == 0 and report["mode"] == "cpu-smoke"
    for name in ("14gb", "12gb", "8gb"):
        r = entries(report)[name]["result"]
        assert r["finite"] and r["updates_skipped"] == 0 and r["step_s"] > 0
        assert r["resolution"] == 64 and r["accumulation"] == 2
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 2 / r["step_s"])
        # the real run and the planner's fake-tensor run build the same LoRA
        assert r["lora_parameters"] == r["planned_lora_parameters"] > 0
        assert r["predicted_peak_gib"] > 0 and r["flops_per_update"] > 0
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_update"] / r["step_s"] / 1e12)
    by = entries(report)
    # the profiles' own settings reach the run: rank 16 / 8 / 4, EMA from 12gb on
    ranks = [by[n]["result"]["lora_parameters"] for n in ("14gb", "12gb", "8gb")]
    assert ranks[0] == 2 * ranks[1] == 4 * ranks[2]
    assert "ema" in by["12gb"]["result"]["plugins"] and "ema" not in by["14gb"]["result"]["plugins"]
    # 6gb: the int8 base, with AdamW where 8-bit AdamW cannot run (the CPU), said in its label
    six = by["6gb (AdamW, not 8-bit)"]["result"]
    assert six["finite"] and six["updates_skipped"] == 0
    assert six["lora_parameters"] == six["planned_lora_parameters"] == ranks[0]  # rank 16
    assert (
        0
        < six["predicted_split_gib"]["weights"]
        < by["14gb"]["result"]["predicted_split_gib"]["weights"]
    )


def test_smoke_variants_train_the_same_model_with_the_kernel_asked_for(smoke) -> None:
    _, report, _ = smoke
    by = entries(report)
    base = by["14gb"]["result"]
    for label, kernels in {
        "14gb + sdpa flash": ["flash"],
        "14gb + sdpa math": ["math"],
        "14gb + sdpa auto": ["flash"],  # the CPU's best: its flash kernel
        "14gb + channels_last": None,
    }.items():
        r = by[label]["result"]
        assert r["attention_kernels"] == kernels, label
        assert r["speedup_vs_default"] == pytest.approx(base["step_s"] / r["step_s"])
        # same seeds, same random base: the first loss agrees up to kernel rounding
        assert r["losses"][0] == pytest.approx(base["losses"][0], rel=1e-4), label
    for label in ("14gb + sdpa efficient", "14gb + sdpa cudnn"):
        assert "does not run on cpu" in by[label]["skipped"]
    for label in ("fp16 + grad scaler", "bf16", "14gb + bf16", "14gb + compile"):
        assert by[label]["skipped"], label


def test_smoke_measures_the_diffusers_scripts_extra_work(smoke, tiny_model_dir) -> None:
    """The VAE encode and both text encoders the diffusers script runs per update: latents of
    the shape the trainer's cache holds (the planner's batch for the same profile), real FLOPs,
    and the script's update as ours plus that work."""
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plan.sim import make_batch
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.train.conditioning import Conditioner

    _, report, _ = smoke
    by = entries(report)
    entry = by["14gb: the diffusers script's extra work"]["result"]
    ours = by["14gb"]["result"]
    assert entry["finite"] and set(entry["by_vae_dtype"]) == {"float32"}  # the CPU: fp32 only
    extra = entry["by_vae_dtype"]["float32"]
    profile = load_profile(
        "14gb", overrides=['model.pretrained="nlora:tiny"', 'model.vae=""', "data.resolution=64"]
    )
    conditioner = Conditioner(torch.device("cpu"), torch.float32, torch.Generator())
    cached = make_batch(profile, load_model_configs(profile.model), conditioner)["latents"]
    assert extra["latents_shape"] == list(cached.shape)
    assert extra["tflop_per_update"] > 0 and extra["step_s"] > 0
    assert extra["script_step_s"] == pytest.approx(ours["step_s"] + extra["step_s"])
    assert extra["ours_over_script"] == pytest.approx(ours["step_s"] / extra["script_step_s"])
    assert 0 < extra["ours_over_script"] < 1


def test_smoke_writes_a_markdown_table_with_every_case(smoke) -> None:
    _, report, text = smoke
    for entry in report["cases"]:
        assert f"| {entry['case']['label']} |" in text
    assert "Failures: none" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_the_gpu_measures_memory_against_the_planner(gpu_check, tmp_path) -> None:
    status = gpu_check.main(
        ["--out", str(tmp_path), "--profiles", "8gb", "--variant-profile", "8gb"]
        + ["--updates", "2", "--warmup", "1", "--budget-s", "120"]
    )
    report = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    r = entries(report)["8gb"]["result"]
    assert status == 0 and r["max_allocated_gib"] > 0 and r["measured_over_predicted"] > 0
