"""The output folder: which runs may share it, and the files a finished run leaves there.

Rule (checked before anything loads): a run may write into an output folder that

* does not exist or is empty (hidden files aside), or
* holds a run with the same *identity* (same model, VAE, data, LoRA shape, batch size,
  accumulation and seed), and either ``--resume`` is given or that run finished (its final
  weights are there; they are replaced).

Anything else is a ``UserError``: a folder of unrelated files, a run of another model or profile,
or an unfinished run of this profile without ``--resume`` (its checkpoints would be lost).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from naruto_lora.errors import UserError
from naruto_lora.lora import WEIGHT_NAME

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


def check_output_folder(output_dir: Path, profile: Any, resume: str | None) -> bool:
    """Apply the module's rule; True when a fresh start replaces an earlier run of the same
    identity (its step-wise files are then cleared)."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise UserError(f"Output path '{output_dir}' is a file, not a folder.")
    if not _visible_entries(output_dir):
        return False
    saved_path = output_dir / PROFILE_NAME
    if not saved_path.is_file():
        raise UserError(
            f"Output folder '{output_dir}' holds files but no {PROFILE_NAME}: it is not a "
            "naruto-lora training output.",
            hint="Choose another --output (or train.output_dir), or empty that folder.",
        )
    saved = tomllib.loads(saved_path.read_text(encoding="utf-8"))
    differences = identity_differences(run_identity(saved), run_identity(profile.to_dict()))
    if differences:
        raise UserError(
            f"Output folder '{output_dir}' holds another run (profile '{saved.get('name')}'), "
            f"which differs in: {'; '.join(differences)}.",
            hint="Choose another --output for this run, or delete that folder.",
        )
    finished = (output_dir / WEIGHT_NAME).is_file()
    if resume is None and not finished and (output_dir / CHECKPOINTS).is_dir():
        raise UserError(
            f"Output folder '{output_dir}' holds an unfinished run of this profile with "
            "checkpoints.",
            hint="Continue it with --resume latest, or choose another --output (or delete the "
            "folder) to start over.",
        )
    return resume is None


def clear_previous_run(output_dir: Path) -> None:
    """Starting over in a folder with a finished run of the same profile: drop its step-wise
    files, so its checkpoints and samples cannot be mistaken for this run's."""
    for name in (CHECKPOINTS, SAMPLES):
        shutil.rmtree(output_dir / name, ignore_errors=True)


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
        "naruto_lora_version": _version(),
    }


def _version() -> str:
    from naruto_lora import __version__

    return __version__


def write_lora_weights(
    folder: Path,
    weights: dict[str, dict[str, Any]],
    adapter_meta: dict[str, Any],
    extra_metadata: dict[str, str],
) -> list[Path]:
    """Write each ``{subfolder: state dict}`` answer of ``nlora_lora_weights_to_save``."""
    from naruto_lora.lora import save_lora

    written = []
    for subfolder, state_dict in weights.items():
        target = folder / subfolder if subfolder else folder
        written.append(save_lora(target, state_dict, adapter_meta, extra_metadata))
    return written
