"""How a run ends: finished (final samples, weights, loss curve, model card) or stopped by a
signal (a checkpoint to resume from)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from naruto_lora.lora.inject import EMA_SUBFOLDER, adapter_metadata, trainable_parameters
from naruto_lora.train.card import RunSummary, write_model_card
from naruto_lora.train.checkpoint import save_checkpoint
from naruto_lora.train.guard import check_final_weights, check_ran_to_the_end
from naruto_lora.train.metrics import LOSS_PLOT_NAME, plot_loss
from naruto_lora.train.outputs import SAMPLES, weights_metadata, weights_to_save, write_lora_weights
from naruto_lora.train.validation import write_samples


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    epoch: int
    interrupted: str | None = None  # the signal's name when Ctrl-C / SIGTERM stopped the run
    checkpoint: Path | None = None
    final_loss: float | None = None
    weights: list[Path] = field(default_factory=list)  # empty on all but the main process
    main_process: bool = True  # False: another process of the run reports it
    processes: int = 1


def checkpoint_now(run: Any) -> Path | None:
    """A checkpoint of the current step: the one just written at this step, or a new one.
    Every process calls this (see ``save_checkpoint``)."""
    last = run.last_checkpoint
    if last is None or last.name != f"step-{run.state.global_step}":
        run.last_checkpoint = save_checkpoint(run)
    return run.last_checkpoint


def interrupted(run: Any, signal_name: str) -> TrainResult:
    path = checkpoint_now(run)
    run.accelerator.end_training()
    return TrainResult(
        output_dir=run.state.output_dir,
        global_step=run.state.global_step,
        epoch=run.position.epoch,
        interrupted=signal_name,
        checkpoint=path,
        final_loss=run.smoothed_loss.value,
        main_process=run.is_main,
        processes=run.accelerator.num_processes,
    )


def _latest_grid(output_dir: Path) -> str | None:
    grids = []
    for path in (output_dir / SAMPLES).glob("step-*.png"):
        match = re.match(r"^step-(\d+)\.png$", path.name)
        if match:
            grids.append((int(match.group(1)), path))
    return f"{SAMPLES}/{max(grids)[1].name}" if grids else None


def _final_samples(run: Any) -> None:
    every = run.profile.validation.every_steps
    step = run.state.global_step
    if run.validation is not None and run.is_main and step > 0 and step % every != 0:
        write_samples(run, step)


def finish(run: Any) -> TrainResult:
    """Last grid and checkpoint, ``nlora_train_end``, then the weights the hooks choose, the
    loss curve and the model card."""
    check_final_weights(_trained_weights(run), run.profile.train.learning_rate)
    _final_samples(run)
    if run.profile.train.checkpoint_every:
        checkpoint_now(run)
    check_ran_to_the_end(run.state.global_step, run.total_steps, run.guard, run.last_checkpoint)
    run.pm.hook.nlora_train_end(state=run.state)
    weights = weights_to_save(run.pm, run.state)
    check_final_weights(weights, run.profile.train.learning_rate)
    written: list[Path] = []
    output_dir = run.state.output_dir
    if run.is_main:
        step = run.state.global_step
        written = write_lora_weights(
            output_dir,
            weights,
            adapter_metadata(run.state.unet),
            weights_metadata(run.profile, step),
        )
        plot_loss(run.metrics.path, output_dir / LOSS_PLOT_NAME)
        write_model_card(run.profile, output_dir, _summary(run, weights))
    run.accelerator.wait_for_everyone()  # every process returns once the outputs are there
    run.accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        global_step=run.state.global_step,
        epoch=run.position.epoch,
        checkpoint=run.last_checkpoint,
        final_loss=run.smoothed_loss.value,
        weights=written,
        main_process=run.is_main,
        processes=run.accelerator.num_processes,
    )


def _trained_weights(run: Any) -> dict[str, dict[str, Any]]:
    """The trainable LoRA parameters, as one state dict (checked before anything is written)."""
    return {"": trainable_parameters(run.state.unet)}


def _summary(run: Any, weights: dict[str, Any]) -> RunSummary:
    return RunSummary(
        steps=run.state.global_step,
        epochs_seen=run.position.epoch + 1,
        items=len(run.dataset),
        final_loss=None if math.isnan(run.smoothed_loss.value) else run.smoothed_loss.value,
        train_s=run.train_s,
        # One process: its device (cuda:1); several: the kind (each has its own index).
        device=str(run.state.device)
        if run.accelerator.num_processes == 1
        else run.state.device.type,
        processes=run.accelerator.num_processes,
        precision={"no": "fp32"}.get(
            run.accelerator.mixed_precision, run.accelerator.mixed_precision
        ),
        sample_grid=_latest_grid(run.state.output_dir),
        has_ema=EMA_SUBFOLDER in weights,
    )
