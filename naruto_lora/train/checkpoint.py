"""Checkpoints in ``OUTPUT/checkpoints/step-N/`` and exact resume from them.

A checkpoint folder holds

* ``pytorch_lora_weights.safetensors`` (and ``ema_unet/...`` with EMA): what
  ``nlora_lora_weights_to_save`` answers, loadable like a finished run's output;
* ``lora_parameters.safetensors``: the trainable parameters by name, exactly, for resume;
* ``training_state.pt``: optimizer, LR scheduler, grad scaler, every RNG state (of every
  process, in a multi-process run), counters, the number of processes;
* ``plugins.pt``: what the plugins returned from ``nlora_checkpoint_state``;
* ``trainer.json``: step, epoch, data position and the run identity, for people and checks.

The folder is built under a temporary name and renamed into place, so a kill at any moment leaves
no half-written checkpoint. Everything loads with ``torch.load(weights_only=True)`` or safetensors.

In a multi-process run every process calls ``save_checkpoint`` (each hands its random states to
the main process, which alone writes) and ``load_checkpoint`` (each restores its own).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from naruto_lora.errors import UserError
from naruto_lora.lora import adapter_metadata
from naruto_lora.train.distributed import gather_objects
from naruto_lora.train.outputs import (
    CHECKPOINTS,
    identity_differences,
    run_identity,
    weights_metadata,
    write_lora_weights,
)
from naruto_lora.train.rng import capture_rng, restore_rng

PARAMS_NAME = "lora_parameters.safetensors"
STATE_NAME = "training_state.pt"
PLUGINS_NAME = "plugins.pt"
INFO_NAME = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest checkpoint of this output folder; otherwise a checkpoint path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume latest: '{output_dir}' has no checkpoints.",
                hint="Start without --resume, or point --resume at a checkpoint folder.",
            )
        return found[-1][1]
    path = Path(resume).expanduser()
    if not (path / STATE_NAME).is_file():
        raise UserError(
            f"--resume '{resume}' is not a checkpoint folder (no {STATE_NAME} in it).",
            hint=f"Use --resume latest or a folder like {output_dir}/{CHECKPOINTS}/step-N.",
        )
    return path


def _plugin_state(run: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for contribution in run.pm.hook.nlora_checkpoint_state(state=run.state):
        for key, value in (contribution or {}).items():
            if key in merged:
                raise RuntimeError(f"two plugins saved checkpoint state under the key {key!r}")
            merged[key] = value
    return merged


def _training_state(run: Any, rng_by_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer, schedule and scaler are the same on every process (DDP keeps the
    parameters equal); the random states are not, so all of them are kept."""
    scaler = run.accelerator.scaler
    return {
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_by_rank[0],
        "rng_by_rank": rng_by_rank,
        "num_processes": len(rng_by_rank),
        "global_step": run.state.global_step,
        "epoch": run.position.epoch,
        "batch_in_epoch": run.position.batch,
        "guard": run.guard.state_dict(),
        "smoothed_loss": run.smoothed_loss.state_dict(),
        "train_s": run.train_s,
    }


def _info(run: Any) -> dict[str, Any]:
    return {
        "step": run.state.global_step,
        "epoch": run.position.epoch,
        "batch_in_epoch": run.position.batch,
        "profile": run.profile.name,
        "num_processes": run.accelerator.num_processes,
        "identity": run_identity(run.profile.to_dict()),
    }


def save_checkpoint(run: Any) -> Path:
    """Write ``checkpoints/step-N`` atomically, then keep only the newest ``checkpoints_keep``.

    Every process calls this; the main process writes, and all return once the checkpoint is
    complete."""
    rng_by_rank = gather_objects(run.accelerator, capture_rng(run.generator))
    path = Path(run.state.output_dir) / CHECKPOINTS / f"step-{run.state.global_step}"
    if run.is_main:
        _write_checkpoint(run, path, rng_by_rank)
    run.accelerator.wait_for_everyone()
    return path


def _write_checkpoint(run: Any, path: Path, rng_by_rank: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    from naruto_lora.io import atomic_dir

    step = run.state.global_step
    plugin_state = _plugin_state(run)
    weights = run.pm.hook.nlora_lora_weights_to_save(state=run.state)
    with atomic_dir(path) as tmp:
        write_lora_weights(
            tmp, weights, adapter_metadata(run.state.unet), weights_metadata(run.profile, step)
        )
        params = {n: p.detach().cpu().contiguous() for n, p in _trainable(run.state.unet).items()}
        save_file(params, str(tmp / PARAMS_NAME))
        torch.save(_training_state(run, rng_by_rank), tmp / STATE_NAME)
        torch.save(plugin_state, tmp / PLUGINS_NAME)
        (tmp / INFO_NAME).write_text(json.dumps(_info(run), indent=2), encoding="utf-8")
    prune_checkpoints(run.state.output_dir, run.profile.train.checkpoints_keep)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def check_checkpoint(path: Path, profile: Any, num_processes: int | None = None) -> None:
    """A checkpoint of this run: same identity (model, data, LoRA shape, batching, seed) and,
    when ``num_processes`` is given, the same number of processes."""
    info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
    differences = identity_differences(info["identity"], run_identity(profile.to_dict()))
    if differences:
        raise UserError(
            f"Checkpoint '{path}' was written by a different run: {'; '.join(differences)}.",
            hint="Resume with the profile and options it was written with (see its "
            "output folder's profile.toml).",
        )
    saved = int(info.get("num_processes", 1))  # checkpoints from before multi-process: one
    if num_processes is not None and saved != num_processes:
        # The data position counts batches of each process's share and the schedule was
        # planned for that many processes: another count would be another run.
        raise UserError(
            f"Checkpoint '{path}' was written by {saved} process(es); this run has "
            f"{num_processes}.",
            hint=f"Resume with {saved} process(es) (e.g. nlora train --num-processes {saved} "
            "..., or the same accelerate launch / torchrun settings).",
        )


def _load_parameters(run: Any, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path / PARAMS_NAME))
    params = _trainable(run.state.unet)
    if set(saved) != set(params):
        raise UserError(f"Checkpoint '{path}' holds other LoRA parameters than this run trains.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def load_checkpoint(run: Any, path: Path) -> None:
    """Restore everything ``save_checkpoint`` wrote; after this the next step is the one the
    checkpointed run would have taken."""
    check_checkpoint(path, run.profile, num_processes=run.accelerator.num_processes)
    _load_parameters(run, path)
    saved = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if saved["scaler"] is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    run.state.global_step = int(saved["global_step"])
    run.state.epoch = int(saved["epoch"])
    run.position.epoch = int(saved["epoch"])
    run.position.batch = int(saved["batch_in_epoch"])
    run.guard.load_state_dict(saved["guard"])
    run.smoothed_loss.load_state_dict(saved["smoothed_loss"])
    run.train_s = float(saved["train_s"])
    plugin_state = torch.load(path / PLUGINS_NAME, map_location="cpu", weights_only=True)
    run.pm.hook.nlora_load_checkpoint_state(state=run.state, saved=plugin_state)
    # Last: nothing after this may draw random numbers before the first resumed step.
    by_rank = saved.get("rng_by_rank") or [saved["rng"]]
    restore_rng(by_rank[run.accelerator.process_index], run.generator)
