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

from naruto_lora.lora.inject import adapter_metadata, trainable_parameters
from naruto_lora.train.distributed import gather_objects
from naruto_lora.train.outputs import (
    CHECKPOINTS,
    identity_differences,
    run_identity,
    weights_metadata,
    weights_to_save,
    write_lora_weights,
)
from naruto_lora.train.rng import capture_rng, restore_rng
from naruto_lora.util.errors import UserError

PARAMS_NAME = "lora_parameters.safetensors"
STATE_NAME = "training_state.pt"
PLUGINS_NAME = "plugins.pt"
INFO_NAME = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders (``step-N``, renamed into place complete), oldest first. Whether their
    files are intact is ``verify_checkpoint``'s question."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint reads back whole; else what is wrong with it.

    Cheap enough to run before every resume: safetensors checks that its header and data cover
    the file exactly, and ``training_state.pt`` / ``plugins.pt`` are zip archives whose entries
    carry CRC-32s (``testzip`` reads them all).
    """
    import zipfile

    from safetensors import safe_open

    info = _read_info(path)
    if isinstance(info, str):
        return info
    for name in (STATE_NAME, PLUGINS_NAME):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"{name} is damaged ({exc})"
        if bad is not None:
            return f"{name} is damaged (entry {bad} fails its checksum)"
    if not (path / PARAMS_NAME).is_file():
        return f"{PARAMS_NAME} is missing"
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                list(fh.keys())
        except Exception as exc:
            return f"{file.relative_to(path)} is damaged ({str(exc).splitlines()[0]})"
    return None


def read_info(path: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint ``verify_checkpoint`` passed."""
    info = _read_info(path)
    if isinstance(info, str):
        raise UserError(f"Checkpoint '{path}' is damaged: {info}.", hint="Nothing was changed.")
    return info


def _read_info(path: Path) -> dict[str, Any] | str:
    """trainer.json as a dict, or what is wrong with it."""
    try:
        info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{INFO_NAME} is missing"
    except (OSError, ValueError) as exc:
        return f"{INFO_NAME} is damaged ({exc})"
    if not isinstance(info, dict) or not isinstance(info.get("identity"), dict):
        return f"{INFO_NAME} is damaged (no run identity in it)"
    return info


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest intact checkpoint of this output folder (damaged newer ones are
    named and passed over); otherwise a checkpoint path, which must be intact."""
    from naruto_lora.util.console import err_console

    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume latest: '{output_dir}' has no checkpoints.",
                hint="Start without --resume, or point --resume at a checkpoint folder.",
            )
        damaged = []
        for _, path in reversed(found):
            problem = verify_checkpoint(path)
            if problem is None:
                for bad, why in damaged:
                    err_console.print(
                        f"[yellow]Checkpoint '{bad}' is damaged ({why}); resuming from the "
                        f"newest intact one, '{path}'. The damaged one is left as it is.[/]",
                        soft_wrap=True,
                    )
                return path
            damaged.append((path, problem))
        raise UserError(
            f"--resume latest: every checkpoint in '{output_dir / CHECKPOINTS}' is damaged: "
            + "; ".join(f"{p.name}: {why}" for p, why in damaged)
            + ".",
            hint="Nothing was changed. Start over with another --output (or --overwrite).",
        )
    path = Path(resume).expanduser()
    if not path.is_dir() or not ((path / STATE_NAME).exists() or (path / INFO_NAME).exists()):
        raise UserError(
            f"--resume '{resume}' is not a checkpoint folder (no {STATE_NAME} in it).",
            hint=f"Use --resume latest or a folder like {output_dir}/{CHECKPOINTS}/step-N.",
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        intact = [
            p for _, p in list_checkpoints(path.parent.parent) if verify_checkpoint(p) is None
        ]
        raise UserError(
            f"Checkpoint '{path}' is damaged: {problem}.",
            hint=(
                f"The newest intact one is '{intact[-1]}'."
                if intact
                else "No intact checkpoint is beside it."
            )
            + " Nothing was changed.",
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
        # The whole resolved profile: a resume compares its settings with these.
        "settings": run.profile.to_dict(),
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
    from naruto_lora.util.io import atomic_dir, save_safetensors, torch_save

    step = run.state.global_step
    plugin_state = _plugin_state(run)
    weights = weights_to_save(run.pm, run.state)
    with atomic_dir(path) as tmp:  # files and folder fsynced before the rename
        write_lora_weights(
            tmp, weights, adapter_metadata(run.state.unet), weights_metadata(run.profile, step)
        )
        params = {
            n: p.detach().cpu().contiguous()
            for n, p in trainable_parameters(run.state.unet).items()
        }
        save_safetensors(tmp / PARAMS_NAME, params)
        torch_save(_training_state(run, rng_by_rank), tmp / STATE_NAME)
        torch_save(plugin_state, tmp / PLUGINS_NAME)
        (tmp / INFO_NAME).write_text(json.dumps(_info(run), indent=2), encoding="utf-8")
    prune_checkpoints(run.state.output_dir, run.profile.train.checkpoints_keep)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(path: Path, profile: Any, num_processes: int | None = None) -> None:
    """A checkpoint of this run: same identity (model, data, LoRA shape, batching, seed) and,
    when ``num_processes`` is given, the same number of processes."""
    info = _read_info(path)
    if isinstance(info, str):
        raise UserError(f"Checkpoint '{path}' is damaged: {info}.", hint="Nothing was changed.")
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
    params = trainable_parameters(run.state.unet)
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
    saved = safe_torch_load(path / STATE_NAME)
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
    plugin_state = safe_torch_load(path / PLUGINS_NAME)
    run.pm.hook.nlora_load_checkpoint_state(state=run.state, saved=plugin_state)
    if run.resume_changes:  # --resume-with-changes: the new values really apply
        from naruto_lora.train.resume import apply_changes
        from naruto_lora.util.console import console

        apply_changes(run)
        console.print(
            "Resuming with changed settings (--resume-with-changes): "
            + "; ".join(c.describe() for c in run.resume_changes)
            + "."
        )
    # Last: nothing after this may draw random numbers before the first resumed step.
    by_rank = saved.get("rng_by_rank") or [saved["rng"]]
    restore_rng(by_rank[run.accelerator.process_index], run.generator)


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a pickle that would run code is a UserError saying so."""
    from naruto_lora.util.errors import unsafe_pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = unsafe_pickle(exc, path)
        if refused is None:
            raise
        raise refused from None
