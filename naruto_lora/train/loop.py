"""The training loop: setup, then for each micro-batch forward, loss, backward; at each
accumulation boundary clip, step, zero-grad, log; the "once in a while" blocks (validation
samples, checkpoints) sit apart.

The step names no plugin: noise, timesteps, loss weights, what follows an update, extra checkpoint
state, the weights validation uses and the weights written at the end are all hook answers.

Several processes (``accelerate launch``, ``torchrun``): each takes its share of every epoch's
batches, DDP averages the gradients in ``backward``, and whether an update is skipped or the run
stops is decided by all of them together (``distributed``); the main process alone writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.train.checkpoint import load_checkpoint, save_checkpoint
from naruto_lora.train.display import TrainDisplay
from naruto_lora.train.distributed import agree_on_stop, agree_on_update
from naruto_lora.train.finish import TrainResult, finish, interrupted
from naruto_lora.train.guard import StopRequest, explain_out_of_memory, stop_on_signals
from naruto_lora.train.lock import output_lock_for
from naruto_lora.train.objective import (
    combine_loss_weights,
    per_sample_mse,
    prediction_target,
    weighted_loss,
)
from naruto_lora.train.run import DataPosition, Run, TrainOptions
from naruto_lora.train.setup import claim_output_folder, setup_run
from naruto_lora.util.console import console


@dataclass
class Window:
    """The micro-batches of one optimizer update (this process's share of them).

    The losses stay on the device until the update's last micro-batch: reading each one
    (``float(loss)``) would wait for the device once per micro-batch; ``agree`` reads them all
    in one transfer. A non-finite micro-batch is therefore seen at the end of its window: its
    gradients are computed, then thrown away with the update."""

    losses: list[torch.Tensor] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    finite: bool = True  # as far as known: set by ``agree``
    loss: float = float("nan")  # the mean over micro-batches and processes, once agreed
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def record(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        self.losses.append(loss.detach())
        captions = batch.get("caption") or [""] * len(batch["index"])
        self.items += [f"#{int(i)} {c!r}" for i, c in zip(batch["index"], captions, strict=True)]

    def agree(self, accelerator: Any) -> None:
        """At the update's last micro-batch, before its ``backward``: the mean loss and whether
        every process's loss was finite. Were one process to skip the backward that all-reduces
        the gradients, the others would wait for it forever."""
        values = torch.stack(self.losses).tolist()  # the window's one device-to-host read
        mean = sum(values) / len(values)
        finite = all(math.isfinite(v) for v in values)
        self.loss, self.finite, self.items = agree_on_update(accelerator, mean, finite, self.items)


@dataclass
class Update:
    applied: bool
    lr: float
    grad_norm: float = float("nan")


def train(profile: Profile, options: TrainOptions | None = None, pm: Any = None) -> TrainResult:
    """Train the profile's LoRA; return when done, or when a signal asked to stop (after writing
    a checkpoint). ``pm`` replaces the profile's plugin manager (tests add tracing plugins)."""
    options = options or TrainOptions()
    with explain_out_of_memory(profile), output_lock_for(profile):
        run = setup_run(profile, options, pm)
        start(run)
        with stop_on_signals(announce=run.is_main) as stop:
            display = TrainDisplay(
                run.total_steps, run.state.global_step, run.memory.kind, enabled=run.is_main
            )
            with display:
                stopped_by = train_loop(run, stop, display)
        if stopped_by:
            return interrupted(run, stopped_by)
        return finish(run)


def start(run: Run) -> None:
    if run.is_main:
        claim_output_folder(run.state.output_dir, run.profile, run.starting_over)
    run.accelerator.wait_for_everyone()  # nobody goes on before the folder is claimed
    run.pm.hook.nlora_train_start(state=run.state)
    if run.resume_from is not None:
        path = run.resume_from
        load_checkpoint(run, path)
        run.last_checkpoint = path
        if run.is_main:
            run.metrics.truncate_after(run.state.global_step)
        console.print(
            f"Resumed from [bold]{path}[/] at step {run.state.global_step} "
            f"(epoch {run.position.epoch + 1})."
        )
    console.print(
        f"Training {run.total_steps} steps, {effective_batch_text(run)}, on {where(run)} "
        f"({run.batches_per_epoch} batches per epoch{per_process(run)}); plugins: "
        f"{', '.join(run.profile.enabled_plugins()) or 'none'}."
    )


def effective_batch_text(run: Run) -> str:
    """Samples per update, e.g. "effective batch 16 (2 processes x batch 4 x accumulation 2)"."""
    train_cfg, processes = run.profile.train, run.accelerator.num_processes
    parts = [
        f"batch {train_cfg.batch_size}",
        f"accumulation {train_cfg.gradient_accumulation_steps}",
    ]
    if processes > 1:
        parts.insert(0, f"{processes} processes")
    total = processes * train_cfg.batch_size * train_cfg.gradient_accumulation_steps
    return f"effective batch {total} ({' x '.join(parts)})"


def where(run: Run) -> str:
    processes = run.accelerator.num_processes
    if processes == 1:
        return str(run.state.device)
    import torch.distributed as dist

    return f"{processes} processes ({run.state.device.type}, {dist.get_backend()})"


def per_process(run: Run) -> str:
    return " per process" if run.accelerator.num_processes > 1 else ""


def train_loop(run: Run, stop: StopRequest, display: TrainDisplay) -> str | None:
    """Train to the last step; return the name of the signal that stopped it early, if any
    (agreed by every process, so they all stop after the same step)."""
    if run.state.global_step >= run.total_steps:
        return None
    window = Window()
    # closing(): stopping early also ends the loader's read-ahead thread right away.
    with contextlib.closing(micro_batches(run)) as batches:
        for position, batch, wait_s in batches:
            window.data_wait_s += wait_s
            ends_window = train_micro_batch(run, window, batch)
            run.position, run.state.epoch = position, position.epoch
            if not ends_window:
                continue
            update = optimizer_update(run, window)
            if update.applied:
                run.pm.hook.nlora_after_optimizer_step(state=run.state)
                log_update(run, window, update, display)
                once_in_a_while(run)
            window = Window()
            stopped_by = agree_on_stop(run.accelerator, stop.signal_name)
            if stopped_by or run.state.global_step >= run.total_steps:
                return stopped_by
    return None


def train_micro_batch(run: Run, window: Window, batch: dict[str, Any]) -> bool:
    """Forward, loss and backward of one micro-batch; True when it ends the update's window."""
    with run.accelerator.accumulate(run.model):
        loss = compute_loss(run, batch)
        window.record(loss, batch)
        if run.accelerator.sync_gradients:
            window.agree(run.accelerator)
        if window.finite:
            run.accelerator.backward(loss)
    return run.accelerator.sync_gradients


def compute_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """Forward one micro-batch and return its (plugin-weighted) loss."""
    state, hook = run.state, run.pm.hook
    cond = run.conditioner(batch)
    hook.nlora_adjust_conditioning(state=state, conditioning=cond, batch=batch)
    noise = hook.nlora_sample_noise(state=state, latents=cond.latents, generator=run.generator)
    timesteps = hook.nlora_sample_timesteps(
        state=state, batch_size=cond.latents.shape[0], device=state.device, generator=run.generator
    )
    noisy_latents = state.noise_scheduler.add_noise(cond.latents, noise, timesteps)
    prediction = run.model(
        noisy_latents.to(state.weight_dtype),
        timesteps,
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs={"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids},
        return_dict=False,
    )[0]
    target = prediction_target(state.noise_scheduler, cond.latents, noise, timesteps)
    per_sample = hook.nlora_per_sample_loss(
        state=state, prediction=prediction, target=target, timesteps=timesteps
    )
    if per_sample is None:  # the core default
        per_sample = per_sample_mse(prediction, target)
    contributions = hook.nlora_loss_weights(state=state, timesteps=timesteps)
    weights = combine_loss_weights(contributions, batch_size=len(timesteps))
    return weighted_loss(per_sample, weights)


def optimizer_update(run: Run, window: Window) -> Update:
    """Clip, step, zero-grad, advance the LR schedule; or skip a non-finite update."""
    lr = run.lr_scheduler.get_last_lr()[0]
    next_step = run.state.global_step + 1
    if not window.finite:
        run.optimizer.zero_grad(set_to_none=True)
        run.guard.skipped(next_step, "the loss", window.items)
        return Update(applied=False, lr=lr)
    grad_norm = float(clip_gradients(run))
    scaler = run.accelerator.scaler
    if not math.isfinite(grad_norm) and scaler is None:
        run.optimizer.zero_grad(set_to_none=True)
        run.guard.skipped(next_step, "the gradient norm", window.items)
        return Update(applied=False, lr=lr, grad_norm=grad_norm)
    step_optimizer(run)
    if run.optimizer.step_was_skipped:
        # fp16: the grad scaler found inf/NaN, lowered its scale and skipped; routine early on.
        return Update(applied=False, lr=lr, grad_norm=grad_norm)
    run.lr_scheduler.step()
    run.state.global_step = next_step
    run.guard.ok()
    return Update(applied=True, lr=lr, grad_norm=grad_norm)


def clip_gradients(run: Any) -> torch.Tensor:
    """The LoRA gradients' total norm, clipped to ``train.max_grad_norm`` (0: no clipping, the
    norm is still measured). Also the planner's: its ``run.accelerator`` stands in."""
    max_norm = run.profile.train.max_grad_norm or math.inf
    return run.accelerator.clip_grad_norm_(run.state.lora_parameters, max_norm)


def step_optimizer(run: Any) -> None:
    """One optimizer step and the gradients let go (also the planner's)."""
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def log_update(run: Run, window: Window, update: Update, display: TrainDisplay) -> None:
    step_s = time.perf_counter() - window.started
    run.train_s += step_s
    loss = window.loss  # agreed: the same on every process, so checkpoints agree too
    smoothed = run.smoothed_loss.update(loss)
    peak_gib = run.memory.gib()
    row = {
        "step": run.state.global_step,
        "epoch": run.position.epoch,
        "loss": loss,
        "lr": update.lr,
        "grad_norm": update.grad_norm,
        "step_s": round(step_s, 5),
        "data_wait_s": round(window.data_wait_s, 5),
        "peak_mem_gib": round(peak_gib, 4),
    }
    for extra in run.pm.hook.nlora_metrics(state=run.state):
        row.update({k: float(v) for k, v in (extra or {}).items() if k not in row})
    if run.is_main:
        run.metrics.append(row)
    if run.options.tensorboard:
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        run.accelerator.log(scalars, step=run.state.global_step)
    display.update(run.state.global_step, run.position.epoch, smoothed, update.lr, peak_gib)


def once_in_a_while(run: Run) -> None:
    """Validation samples, then a checkpoint, on their own step grids (main process writes;
    the others go on and wait for it in the next step's all-reduce)."""
    from naruto_lora.train.metrics import LOSS_PLOT_NAME, plot_loss
    from naruto_lora.train.validation import write_samples

    step, cfg = run.state.global_step, run.profile
    if run.validation is not None and step % cfg.validation.every_steps == 0 and run.is_main:
        write_samples(run, step)
    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
        run.last_checkpoint = save_checkpoint(run)  # every process: each hands in its RNG
        if run.is_main:
            plot_loss(run.metrics.path, run.state.output_dir / LOSS_PLOT_NAME)


def micro_batches(run: Run) -> Iterator[tuple[DataPosition, dict[str, Any], float]]:
    """The data from the run's position on, epoch after epoch, each epoch's order fixed by
    (seed, epoch); yields (position after this batch, batch, seconds waited for it)."""
    from naruto_lora.cache import make_batch_sampler, make_loader

    train_cfg = run.profile.train
    epoch, done = run.position.epoch, run.position.batch
    if done >= run.batches_per_epoch:
        epoch, done = epoch + 1, 0
    while epoch < train_cfg.epochs:
        sampler = make_batch_sampler(
            run.dataset,
            train_cfg.batch_size,
            train_cfg.seed,
            epoch,
            skip_batches=done,
            num_replicas=run.accelerator.num_processes,
            rank=run.accelerator.process_index,
        )
        loader = make_loader(
            run.dataset,
            sampler,
            workers=train_cfg.dataloader_workers,
            pin_memory=run.state.device.type == "cuda",
        )
        batches = iter(loader)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            done += 1
            yield DataPosition(epoch, done), batch, time.perf_counter() - waited
        epoch, done = epoch + 1, 0
