"""Mixed-precision training on a CUDA GPU (skipped cleanly without one): fp16 with its grad
scaler, bf16, fused AdamW, the EMA shadow on the GPU, a checkpoint with the scaler state, and a
resume from it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.metrics import read_metrics
from tests.train_support import (
    ALL_PLUGINS,
    SignalAt,
    load_with_diffusers,
    lora_problems,
    plugin_manager,
    tiny_profile,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_and_resume_on_cuda(
    precision: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / "run"
    profile = tiny_profile(
        tmp_path / "cache",
        out,
        f'train.mixed_precision="{precision}"',
        "train.checkpoint_every=2",
        "validation.every_steps=2",
        enable=ALL_PLUGINS,
    )
    first = train(profile, TrainOptions(device="cuda"), pm=plugin_manager(profile, SignalAt(2)))
    assert first.interrupted == signal.Signals.SIGTERM.name and first.global_step == 2
    saved = torch.load(first.checkpoint / "training_state.pt", weights_only=True)
    assert (saved["scaler"] is not None) == (precision == "fp16")
    assert saved["optimizer"]["param_groups"][0]["fused"] is True

    second = train(profile, TrainOptions(device="cuda", resume="latest"))
    assert second.global_step == 4
    for folder in (out, out / EMA_SUBFOLDER):
        weights = load_file(str(folder / WEIGHT_NAME))
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
        _, reports = load_with_diffusers(tiny_model_dir, folder, monkeypatch)
        assert lora_problems(reports) == []
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["peak_mem_gib"] > 0 for r in rows)
    assert (out / "samples" / "step-4.png").is_file()
