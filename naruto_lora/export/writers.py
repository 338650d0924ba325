"""``nlora export``: write a trained LoRA for every SDXL tool, and prove each file loads.

Formats:

* ``kohya`` (default): one ``.safetensors`` with ``lora_unet_<original SDXL name>.lora_down`` /
  ``lora_up`` / ``alpha`` keys: what ComfyUI, AUTOMATIC1111/Forge and diffusers all read;
* ``diffusers``: the training output layout (``unet.<module>.lora_A/B`` + adapter config);
* ``peft``: ``adapter_model.safetensors`` + ``adapter_config.json`` for ``PeftModel.from_pretrained``;
* ``merged``: a full diffusers pipeline folder with the LoRA fused into the UNet at ``--scale``.

Every file is written under a temporary name, loaded back through the loader its users run
(diffusers' ``load_lora_weights`` path for LoRA files, peft for the peft format too, a reload of
the saved pipeline for ``merged``), compared with the training output, and only then renamed into
place: a failed export leaves nothing at ``--out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from naruto_lora.util.errors import UserError
from naruto_lora.util.io import fsync_dir, usual_file_mode

if TYPE_CHECKING:
    import torch

    from naruto_lora.lora.weights import LoraWeights

FORMATS = ("kohya", "diffusers", "peft", "merged")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
# Largest relative difference allowed between a loaded-back delta and the training output's:
# rounding the weights to the export dtype (fp16 keeps 11 significant bits, bf16 8).
TOLERANCE = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
MERGED_INFO_NAME = "nlora_export.json"
SDXL_BASE_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    modules: int
    loaders: tuple[str, ...]  # what loaded it back
    max_error: float  # largest relative delta difference found by the check
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the user should know about where the file works


# --------------------------------------------------------------------------- naming and paths


def default_name(lora_file: Path) -> str:
    """A file name stem that says which run (and which weights of it) this is."""
    from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME

    if lora_file.name != WEIGHT_NAME:
        return lora_file.stem
    folder = lora_file.parent
    if folder.name == EMA_SUBFOLDER:
        return f"{folder.parent.name}-ema"
    if folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


def target_path(fmt: str, out: Path, lora_file: Path) -> Path:
    """The file (LoRA formats) or folder (peft, merged) ``--out`` stands for."""
    from naruto_lora.lora.inject import WEIGHT_NAME

    if fmt not in FORMATS:
        raise UserError(
            f"Unknown export format '{fmt}'.", hint=f"Choose one of: {', '.join(FORMATS)}."
        )
    is_file = out.suffix.lower() == ".safetensors"
    if fmt in ("peft", "merged"):
        if is_file:
            raise UserError(
                f"--format {fmt} writes a folder, but --out '{out}' names a .safetensors file.",
                hint="Give a folder path for --out.",
            )
        target = out
    elif is_file:
        target = out
    else:
        target = out / (
            WEIGHT_NAME if fmt == "diffusers" else f"{default_name(lora_file)}.safetensors"
        )
    if target.resolve() == lora_file.resolve():
        raise UserError(
            f"--out '{out}' would overwrite the LoRA being exported.", hint="Choose another --out."
        )
    return target


def check_folder_target(target: Path, marker: str, overwrite: bool = False) -> None:
    """A folder export replaces ``target`` whole, so only an earlier export of the same kind may
    be there, and only with ``--overwrite``; anything else would be deleted."""
    if target.is_file():
        raise UserError(f"--out '{target}' is a file; this format writes a folder.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not (target / marker).is_file():
        raise UserError(
            f"--out '{target}' is a folder with other files in it; exporting there would replace them.",
            hint="Choose a new folder (or, with --overwrite, an earlier export of this format) "
            "for --out.",
        )
    if not overwrite:
        raise UserError(
            f"--out '{target}' already holds an export ({marker} is there); it is not replaced "
            "without --overwrite.",
            hint="Choose another --out, or give --overwrite to replace it.",
        )


def describe_file(path: Path) -> str:
    """What an existing file is, in a few words, for a refusal to replace it."""
    size = path.stat().st_size
    if path.suffix.lower() != ".safetensors":
        return f"a file of {size:,} bytes"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys, meta = list(fh.keys()), fh.metadata() or {}
    except Exception:
        return f"a file of {size:,} bytes that is not a readable safetensors file"
    lora = [k for k in keys if "lora" in k.lower()]
    if not lora:
        return f"a safetensors file of {len(keys)} tensors that is not a LoRA ({size:,} bytes)"
    made = meta.get("nlora.profile") or meta.get("profile")
    steps = meta.get("nlora.steps") or meta.get("steps") or meta.get("ss_steps")
    about = f", profile '{made}'" if made else ""
    about += f", {steps} steps" if steps else ""
    return f"a LoRA file ({len(lora)} LoRA tensors{about}, {size:,} bytes)"


def check_file_target(target: Path, fmt: str, overwrite: bool) -> None:
    if target.is_dir():
        raise UserError(
            f"'{target}' is a folder; --format {fmt} writes a file there.",
            hint="Give a .safetensors path for --out.",
        )
    if target.exists() and not overwrite:
        raise UserError(
            f"--out '{target}' already exists: {describe_file(target)}. It is not replaced "
            "without --overwrite.",
            hint="Choose another --out, or give --overwrite to replace it.",
        )


# --------------------------------------------------------------------------- metadata


def architecture(unet_config: Mapping[str, Any]) -> str:
    """modelspec's architecture id when the UNet is SDXL base's; a plain description otherwise."""
    sdxl = (
        list(unet_config.get("block_out_channels", [])) == [320, 640, 1280]
        and unet_config.get("cross_attention_dim") == 2048
        and unet_config.get("addition_embed_type") == "text_time"
    )
    return SDXL_BASE_ARCHITECTURE if sdxl else "sdxl-architecture-custom/lora"


def shareable_model_name(model: str) -> str:
    """A base model as it may appear in a shared file: a hub id (or ``nlora:`` id) as given, a
    local folder by its name only (a path would tell the world the trainer's folders)."""
    if model.startswith("nlora:"):
        return model
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith(("~", ".")) or "\\" in model
    if looks_local or path.exists() or model.count("/") > 1:
        return path.name or model
    return model


def _training_value(weights: LoraWeights, key: str) -> str | None:
    """A value the trainer wrote, under our prefixed or its plain key."""
    return weights.metadata.get(f"nlora.{key}") or weights.metadata.get(key)


def export_metadata(
    weights: LoraWeights,
    unet_config: Mapping[str, Any],
    model_cfg: Any,
    profile: Any | None,
    fmt: str,
) -> dict[str, str]:
    """What every exported file says about itself: ours (``nlora.*``), kohya-ss's ``ss_*`` keys
    (shown by AUTOMATIC1111 and model sites) and Stability's ``modelspec.*``."""
    from naruto_lora import __version__

    rank = weights.ranks().most_common(1)[0][0]
    alpha = weights.alphas().most_common(1)[0][0]
    resolution = _training_value(weights, "resolution") or (
        str(profile.data.resolution) if profile else ""
    )
    base_model = shareable_model_name(
        _training_value(weights, "base_model") or model_cfg.pretrained
    )
    arch = architecture(unet_config)
    now = time.time()
    values = {
        "base_model": base_model,
        "vae": shareable_model_name(
            _training_value(weights, "vae") or model_cfg.vae or "(the model's own)"
        ),
        "architecture": arch,
        "rank": str(rank),
        "alpha": f"{alpha:g}",
        "resolution": resolution,
        "steps": _training_value(weights, "steps") or "",
        "profile": _training_value(weights, "profile") or (profile.name if profile else ""),
        "training_seconds": _training_value(weights, "training_seconds") or "",
        "modules": str(len(weights.modules)),
        # the frozen base's storage while training ("int8"/"fp8": a quantized base); the file is
        # a normal LoRA for the full-precision base either way
        "trained_base_weights": _training_value(weights, "base_weights") or "full",
        "source": f"{weights.path.parent.name}/{weights.path.name}",  # no home folders in shared files
        "format": fmt,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "version": __version__,
    }
    metadata = {f"nlora.{k}": v for k, v in values.items()}
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_sd_model_name": base_model,
            "ss_resolution": f"({resolution}, {resolution})" if resolution else "",
            "ss_steps": values["steps"],
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": arch,
            # kohya keys are SGM (Stability's generative-models) module names; the spec marks
            # this key required, and kohya's own trainers write this value for SDXL.
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            "modelspec.title": default_name(weights.path),
            "modelspec.resolution": f"{resolution}x{resolution}" if resolution else "",
        }
    )
    if weights.use_dora:
        metadata["nlora.use_dora"] = "true"
        # LyCORIS's names for output-axis DoRA, which tools show as the training's network args
        metadata["ss_network_args"] = json.dumps({"dora_wd": "True", "wd_on_out": "True"})
    if arch == SDXL_BASE_ARCHITECTURE:
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    return metadata


def weights_sha256(serialized: bytes) -> str:
    """sha256 of a safetensors file's tensor data (what follows the header), so the hash does not
    change with the metadata; kohya-ss and AUTOMATIC1111 call this the model hash."""
    header_len = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(memoryview(serialized)[8 + header_len :]).hexdigest()


def file_weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> str:
    """Write with the weights' hash in the metadata; returns the hash."""
    from safetensors.torch import save

    from naruto_lora.util.io import save_safetensors

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = weights_sha256(save(tensors))
    save_safetensors(
        path, tensors, {**metadata, "nlora.weights_sha256": digest, "sshs_model_hash": digest}
    )
    return digest


def _usual_folder_mode(folder: Path) -> None:
    """Temp folders are created private (0700); an export is meant to be shared like any folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


# --------------------------------------------------------------------------- the formats


def kohya_tensors(weights: LoraWeights, unet_config: Mapping[str, Any], dtype: torch.dtype) -> dict:
    """kohya keys for every module, all with the same alpha.

    A module whose alpha differs gets the ratio folded into its up weight instead (same update,
    ``alpha / rank * up @ down``): diffusers' kohya loader turns per-module alphas of attention
    layers into patterns that match nothing and silently scales them wrong, while ComfyUI and
    AUTOMATIC1111 read either form.
    """
    import torch

    from naruto_lora.lora.kohya import SgmLayout, kohya_name

    layout = SgmLayout.from_config(unet_config)
    alpha = weights.alphas().most_common(1)[0][0]
    tensors = {}
    for module, lora in sorted(weights.modules.items()):
        name = kohya_name(module, layout)
        up = lora.up if lora.alpha == alpha else lora.up.float() * (lora.alpha / alpha)
        tensors[f"{name}.lora_down.weight"] = lora.down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        # fp32 keeps any alpha exact; every reader takes it with .item().
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if lora.magnitude is not None:
            tensors[f"{name}.dora_scale"] = lora.kohya_magnitude().to(dtype)
    return tensors


def _adapter_metadata(weights: LoraWeights, prefix: str, base_model: str) -> str:
    from naruto_lora.lora.weights import peft_config_dict

    config = {
        **peft_config_dict(weights),
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
    }
    return json.dumps({f"{prefix}{k}": v for k, v in config.items()}, sort_keys=True)


def write_lora_file(
    fmt: str,
    path: Path,
    weights: LoraWeights,
    unet_config: Mapping[str, Any],
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> str:
    """Write a kohya or diffusers file; returns the weights' hash."""
    from naruto_lora.lora.inject import ADAPTER_METADATA_KEY, UNET_PREFIX
    from naruto_lora.lora.weights import peft_state_dict

    if fmt == "kohya":
        return write_safetensors(path, kohya_tensors(weights, unet_config, dtype), metadata)
    tensors = peft_state_dict(weights, prefix=UNET_PREFIX, dtype=dtype)
    extra = {
        "format": "pt",
        ADAPTER_METADATA_KEY: _adapter_metadata(weights, UNET_PREFIX, metadata["nlora.base_model"]),
    }
    return write_safetensors(path, tensors, {**metadata, **extra})


def write_peft_folder(
    folder: Path, weights: LoraWeights, dtype: torch.dtype, metadata: dict[str, str]
) -> str:
    """PEFT's own layout (``PeftModel.save_pretrained``); the adapter config is also in the
    safetensors metadata under diffusers' key, with peft's key prefix, so diffusers'
    ``load_lora_adapter(..., prefix="base_model.model")`` gets the right alpha too."""
    from peft import LoraConfig

    from naruto_lora.lora.inject import ADAPTER_METADATA_KEY
    from naruto_lora.lora.weights import (
        PEFT_PREFIX,
        PEFT_WEIGHT_NAME,
        peft_config_dict,
        peft_state_dict,
    )

    config = LoraConfig(
        **peft_config_dict(weights), base_model_name_or_path=metadata["nlora.base_model"]
    )
    config.save_pretrained(str(folder))
    tensors = peft_state_dict(weights, prefix=PEFT_PREFIX, dtype=dtype)
    extra = {
        "format": "pt",
        ADAPTER_METADATA_KEY: _adapter_metadata(weights, PEFT_PREFIX, metadata["nlora.base_model"]),
    }
    return write_safetensors(folder / PEFT_WEIGHT_NAME, tensors, {**metadata, **extra})


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A path with ``target``'s own name inside a hidden temp folder beside it (diffusers picks
    its file reader by the extension, so the file must be checked under its real name); renamed
    over ``target`` on success. On failure nothing is left, not even folders created for it."""
    first_missing = next(
        (p for p in [*reversed(target.parent.parents), target.parent] if not p.exists()), None
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = stage / target.name
        yield staged
        with open(staged, "rb+") as fh:
            os.fsync(fh.fileno())
        usual_file_mode(staged)
        os.replace(staged, target)
        fsync_dir(target.parent)
    except BaseException:
        if first_missing is not None:
            shutil.rmtree(first_missing, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------- running


def _unet_config(model_cfg: Any) -> dict[str, Any]:
    """The base UNet's config (no weights): what the kohya names and the checks are built from."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.models.loading import resolve_model

    model_id = resolve_model(model_cfg.pretrained)
    kwargs = {"revision": model_cfg.revision} if model_cfg.revision else {}
    try:
        return dict(UNet2DConditionModel.load_config(model_id, subfolder="unet", **kwargs))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not read the UNet config of the base model '{model_cfg.pretrained}': "
            f"{str(exc).splitlines()[0]}",
            hint="Export checks the LoRA against its base model: give --model (or run export "
            "where the training's model is available).",
        ) from exc


def export_lora(
    *,
    lora_file: Path,
    fmt: str,
    out: Path,
    model_cfg: Any,
    run_profile: Any | None = None,
    scale: float = 1.0,
    dtype_name: str = "fp16",
    overwrite: bool = False,
) -> ExportResult:
    """Read the LoRA, check it fits the base model (``model_cfg``), write ``fmt`` at ``out`` and
    verify it. ``run_profile`` is the training run's resolved profile (None for a loose file):
    metadata the weights file lacks is taken from it, never from an unrelated profile."""
    from naruto_lora.lora.weights import PEFT_CONFIG_NAME, read_lora, weightless_unet
    from naruto_lora.util.devices import DTYPES

    target = target_path(fmt, out, lora_file)
    if dtype_name not in EXPORT_DTYPES:
        raise UserError(f"Unknown --dtype '{dtype_name}'.", hint="Choose fp16, bf16 or fp32.")
    dtype = DTYPES[dtype_name]
    if fmt in ("peft", "merged"):
        marker = PEFT_CONFIG_NAME if fmt == "peft" else "model_index.json"
        check_folder_target(target, marker, overwrite)
    else:
        check_file_target(target, fmt, overwrite)
    unet_config = _unet_config(model_cfg)
    weights = read_lora(lora_file, weightless_unet(unet_config))
    metadata = export_metadata(weights, unet_config, model_cfg, run_profile, fmt)
    metadata["nlora.dtype"] = dtype_name
    if fmt == "merged":
        return _export_merged(target, weights, model_cfg, scale, dtype, metadata)
    return _export_lora_file(fmt, target, weights, unet_config, dtype, metadata)


def _export_lora_file(
    fmt: str,
    target: Path,
    weights: LoraWeights,
    unet_config: dict[str, Any],
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> ExportResult:
    from naruto_lora.export.verify import verify_lora_file
    from naruto_lora.lora.weights import PEFT_WEIGHT_NAME
    from naruto_lora.util.io import atomic_dir

    tolerance = TOLERANCE[metadata["nlora.dtype"]]
    if fmt == "peft":
        with atomic_dir(target) as tmp:
            _usual_folder_mode(tmp)
            digest = write_peft_folder(tmp, weights, dtype, metadata)
            loaders, worst = verify_lora_file(
                fmt, tmp / PEFT_WEIGHT_NAME, weights, unet_config, tolerance
            )
    else:
        with staged_file(target) as tmp:
            digest = write_lora_file(fmt, tmp, weights, unet_config, dtype, metadata)
            loaders, worst = verify_lora_file(fmt, tmp, weights, unet_config, tolerance)
    metadata["nlora.weights_sha256"] = digest
    notes = DORA_KOHYA_NOTES if fmt == "kohya" and weights.use_dora else ()
    return ExportResult(target, fmt, len(weights.modules), loaders, worst, metadata, notes)


DORA_KOHYA_NOTES = (
    "DoRA: the magnitudes are dora_scale keys of shape (out, 1) / (out, 1, 1, 1), the output-axis "
    "layout ComfyUI and Forge read. diffusers' load_lora_weights drops dora_scale from kohya "
    "files and applies plain LoRA: for diffusers use --format diffusers.",
    "DoRA: ComfyUI and Forge divide output-axis DoRA by the norm of the base weight rather than "
    "of base + LoRA (ComfyUI PR #15458), and AUTOMATIC1111 reads every dora_scale as "
    "input-axis, so there the result is approximate (ComfyUI, Forge) or wrong (A1111); "
    "--format merged gives the exact weights to any tool. See docs/training.md.",
)


def _export_merged(
    target: Path,
    weights: LoraWeights,
    model_cfg: Any,
    scale: float,
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> ExportResult:
    """The base pipeline with the LoRA fused into the UNet at ``scale``, adapter layers removed
    so the folder loads in any diffusers version (and converts to a single-file checkpoint)."""
    from naruto_lora.export.verify import probe_layers, verify_merged
    from naruto_lora.sample.pipeline import fuse_lora, load_pipeline
    from naruto_lora.util.io import atomic_dir

    pipe = load_pipeline(model_cfg, dtype)
    probes = probe_layers(pipe.unet, weights, scale)
    fuse_lora(pipe, weights, scale)
    metadata = {**metadata, "nlora.lora_scale": f"{scale:g}"}
    with atomic_dir(target) as tmp:
        _usual_folder_mode(tmp)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / MERGED_INFO_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        fused_unet = pipe.unet
        del pipe  # saved: free the text encoders and VAE before the UNet is loaded a second time
        worst = verify_merged(
            tmp, fused_unet, probes, weights, scale, dtype, TOLERANCE[metadata["nlora.dtype"]]
        )
    return ExportResult(
        target, "merged", len(weights.modules), ("diffusers from_pretrained",), worst, metadata
    )
