"""The output folder: which runs may share it, and the files a finished run leaves there.

Rule (checked before anything loads): a run may write into an output folder that

* does not exist or is empty (hidden files aside), or
* holds a run with the same *identity* (same model, VAE, data, LoRA shape, batch size,
  accumulation and seed) and ``--resume`` is given, or
* holds a run that never wrote a checkpoint nor its final weights (a run that failed early), or
* holds a naruto-lora run and ``--overwrite`` is given: that run's files are replaced.

Anything else is a ``UserError``: a folder of unrelated files (even with ``--overwrite``: they
are not ours to delete), a run of another model or profile, a finished run (its LoRA would be
replaced) or an unfinished run with checkpoints without ``--resume``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME
from naruto_lora.util.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_NAME = "profile.toml"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
TRAIN_KEYS = ("batch_size", "gradient_accumulation_steps", "seed")


def run_identity(profile_table: dict[str, Any]) -> dict[str, Any]:
    """The keys that make two runs the same run: what they train on and what they train."""
    identity = {}
    for section in ("model", "data", "lora"):
        for key, value in profile_table.get(section, {}).items():
            identity[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    for key in TRAIN_KEYS:
        identity[f"train.{key}"] = profile_table.get("train", {}).get(key)
    return identity


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def read_saved_profile(output_dir: Path) -> dict[str, Any]:
    """The folder's profile.toml as a table; a damaged one is a UserError that says the
    checkpoints are intact (deleting the folder would lose them)."""
    path = output_dir / PROFILE_NAME
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        kept = CHECKPOINTS if (output_dir / CHECKPOINTS).is_dir() else "its other files"
        raise UserError(
            f"'{path}' is damaged ({exc}); it records the run this output folder holds, so "
            "naruto-lora cannot tell whether this run may continue there.",
            hint=f"Do not delete the folder: {kept} and the weights are not affected. Restore "
            f"{PROFILE_NAME} (each checkpoint's trainer.json holds the run's profile under "
            '"settings"), or train into another --output.',
        ) from None


def check_output_folder(
    output_dir: Path, profile: Any, resume: str | None, overwrite: bool = False
) -> bool:
    """Apply the module's rule; True when this run starts over a run that was there (its
    step-wise files and final outputs are then cleared by ``clear_previous_run``)."""
    if resume is not None and overwrite:
        raise UserError(
            "--resume continues the run in the output folder and --overwrite replaces it: "
            "give one of them."
        )
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise UserError(f"Output path '{output_dir}' is a file, not a folder.")
    if not _visible_entries(output_dir):
        return False
    if not (output_dir / PROFILE_NAME).is_file():
        raise UserError(
            f"Output folder '{output_dir}' holds files but no {PROFILE_NAME}: it is not a "
            "naruto-lora training output.",
            hint="Choose another --output (or train.output_dir), or empty that folder "
            "(--overwrite only replaces naruto-lora runs).",
        )
    if overwrite:
        return True
    saved = read_saved_profile(output_dir)
    differences = identity_differences(run_identity(saved), run_identity(profile.to_dict()))
    if differences:
        raise UserError(
            f"Output folder '{output_dir}' holds another run (profile '{saved.get('name')}'), "
            f"which differs in: {'; '.join(differences)}.",
            hint="Choose another --output for this run, or give --overwrite to replace that run.",
        )
    if resume is not None:
        return False
    if (output_dir / WEIGHT_NAME).is_file():
        raise UserError(
            f"Output folder '{output_dir}' holds a finished run of this profile; training there "
            f"would replace its LoRA ({WEIGHT_NAME}) and checkpoints.",
            hint="Continue it with --resume latest (e.g. with a higher train.max_steps and "
            "--resume-with-changes), choose a new --output, or give --overwrite to replace it.",
        )
    if (output_dir / CHECKPOINTS).is_dir() and any((output_dir / CHECKPOINTS).iterdir()):
        raise UserError(
            f"Output folder '{output_dir}' holds an unfinished run of this profile with "
            "checkpoints.",
            hint="Continue it with --resume latest, choose another --output, or give "
            "--overwrite to start over (its checkpoints are deleted).",
        )
    return True


# What a run leaves in its output folder, removed when a new run starts over there.
RUN_OUTPUTS = (CHECKPOINTS, SAMPLES, WEIGHT_NAME, EMA_SUBFOLDER, "loss.png", "README.md", "logs")


def clear_previous_run(output_dir: Path) -> None:
    """Starting over in a folder of an earlier run: drop its outputs, so its checkpoints,
    samples and weights cannot be mistaken for this run's (files we did not write stay)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)


def weights_metadata(profile: Any, steps: int) -> dict[str, str]:
    """safetensors metadata of the written LoRA (beside diffusers' adapter config)."""
    return {
        "base_model": profile.model.pretrained,
        "vae": profile.model.vae or "(the model's own)",
        "profile": profile.name,
        "rank": str(profile.lora.rank),
        "alpha": f"{profile.lora.alpha:g}",
        "resolution": str(profile.data.resolution),
        "steps": str(steps),
        "target_modules": ",".join(profile.lora.target_modules),
        "use_dora": str(profile.lora.use_dora).lower(),
        "base_weights": profile.model.base_weights,
        "naruto_lora_version": _version(),
    }


def _version() -> str:
    from naruto_lora import __version__

    return __version__


def weights_to_save(pm: Any, state: Any) -> dict[str, dict[str, Any]]:
    """The trained weights (at ``""``, the folder itself) and every plugin's extra weight sets
    (``nlora_lora_weights_to_save``), as ``{subfolder: peft state dict}``."""
    weights: dict[str, dict[str, Any]] = {"": state.lora_state_dict()}
    for extra in pm.hook.nlora_lora_weights_to_save(state=state):
        for subfolder, state_dict in (extra or {}).items():
            if subfolder in weights or not subfolder or "/" in subfolder or subfolder[0] == ".":
                raise UserError(
                    f"A plugin asked to save LoRA weights into subfolder {subfolder!r}, which is "
                    "taken or not a plain folder name.",
                    hint="Each plugin saves into a subfolder of its own (e.g. its name).",
                )
            weights[subfolder] = state_dict
    return weights


def write_lora_weights(
    folder: Path,
    weights: dict[str, dict[str, Any]],
    adapter_meta: dict[str, Any],
    extra_metadata: dict[str, str],
) -> list[Path]:
    """Write each ``{subfolder: state dict}`` of ``weights_to_save``."""
    from naruto_lora.lora.inject import save_lora

    written = []
    for subfolder, state_dict in weights.items():
        target = folder / subfolder if subfolder else folder
        written.append(save_lora(target, state_dict, adapter_meta, extra_metadata))
    return written
