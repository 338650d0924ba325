"""The planner's models: their configs (a local folder, the hub cache, or the published SDXL
configs), built without weights on the meta device and materialised as fake tensors.

Nothing here downloads anything: a hub id is looked up in the local hub cache only, and when the
cache has no copy the published SDXL configs of ``naruto_lora.models.sdxl_configs`` stand in (the report
says so).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.models import sdxl_configs
from naruto_lora.util.errors import UserError

PARTS = ("unet", "text_encoder", "text_encoder_2", "vae", "scheduler")


@dataclass(frozen=True)
class ModelConfigs:
    """The configs of the five parts of an SDXL model, and where they came from."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    source: str
    notes: tuple[str, ...] = field(default=())

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def default_resolution(self) -> int:
        """The size the model samples at by default (UNet sample size x VAE factor)."""
        return int(self.unet["sample_size"]) * self.vae_scale_factor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"Cannot read the model config '{path}': {exc}.") from exc


def _from_folder(folder: Path, part: str) -> dict[str, Any] | None:
    sub, name = sdxl_configs.SUBFOLDERS[part]
    for candidate in (folder / sub / name, folder / name if part == "vae" else None):
        if candidate is not None and candidate.is_file():
            return _read_json(candidate)
    return None


def _from_hub_cache(repo_id: str, part: str, revision: str, standalone: bool) -> dict | None:
    """A config from the local hub cache (never the network); None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return None
    sub, name = sdxl_configs.SUBFOLDERS[part]
    filename = name if standalone else f"{sub}/{name}"
    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    except Exception:  # a malformed repo id: not cached, as far as we are concerned
        return None
    return _read_json(Path(found)) if isinstance(found, str) else None


def _local_folder(model_id: str) -> Path | None:
    from naruto_lora.models.loading import resolve_model

    if model_id.startswith("nlora:"):
        return Path(resolve_model(model_id))
    path = Path(model_id).expanduser()
    if path.exists():
        return Path(resolve_model(model_id))
    return None


def _part_config(model_id: str, part: str, revision: str, standalone: bool) -> tuple[dict, str]:
    """(config, where it came from) for one part of ``model_id``."""
    folder = _local_folder(model_id)
    if folder is not None:
        found = _from_folder(folder, part)
        if found is None:
            raise UserError(
                f"'{folder}' has no {'/'.join(sdxl_configs.SUBFOLDERS[part])}.",
                hint="Point --model at a diffusers SDXL folder (save_pretrained layout).",
            )
        return found, str(folder)
    found = _from_hub_cache(model_id, part, revision, standalone)
    if found is not None:
        return found, f"{model_id} (hub cache)"
    published = sdxl_configs.published_configs(
        fp16_fix_vae=model_id == sdxl_configs.SDXL_FP16_FIX_VAE_ID
    )
    return published[part], "published SDXL configs"


def load_model_configs(model_cfg: Any, model: str | None = None) -> ModelConfigs:
    """The configs of the profile's model (``model`` overrides ``model.pretrained``)."""
    model_id = model or model_cfg.pretrained
    configs: dict[str, dict] = {}
    sources: set[str] = set()
    for part in PARTS:
        if part == "vae" and model_cfg.vae and model is None:
            configs[part], where = _part_config(model_cfg.vae, part, "", standalone=True)
        else:
            configs[part], where = _part_config(model_id, part, model_cfg.revision, False)
        sources.add(where)
    notes = []
    if "published SDXL configs" in sources:
        notes.append(
            f"'{model_id}' is not a local folder and the hub cache has no copy of its configs: "
            "the published SDXL base 1.0 architecture stands in for it."
        )
    if configs["unet"].get("addition_embed_type") != "text_time":
        raise UserError(
            f"'{model_id}' is not an SDXL-architecture model (its UNet config has "
            f"addition_embed_type={configs['unet'].get('addition_embed_type')!r}).",
            hint="The planner models SDXL training; use an SDXL base model.",
        )
    return ModelConfigs(**configs, source=" + ".join(sorted(sources)), notes=tuple(notes))


# ------------------------------------------------------------------------------ meta models


def _clip_config(cfg: dict[str, Any]):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers warn about dtype casts and meta weights; none apply here."""
    import diffusers
    import transformers

    old = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(old[0])
        transformers.logging.set_verbosity(old[1])


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build on the meta device, outside any fake or tracking mode: module casts and peft's
    adapter moves swap tensors, which fake tensors do not allow."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), quiet_libraries(), torch.device("meta"):
        yield


def meta_unet(configs: ModelConfigs, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with on_meta():
        unet = UNet2DConditionModel.from_config(configs.unet)
        # nn.Module.to: diffusers' .to() warns about fp32-only modules, which SDXL has none of.
        return torch.nn.Module.to(unet, dtype=dtype)


def clip_text_encoders(configs: ModelConfigs, dtype: torch.dtype) -> tuple[Any, Any]:
    """Both CLIP text encoders from their configs, frozen, on the current default device."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(_clip_config(configs.text_encoder))
    second = CLIPTextModelWithProjection(_clip_config(configs.text_encoder_2))
    encoders = tuple(torch.nn.Module.to(e, dtype=dtype) for e in (first, second))
    for encoder in encoders:
        encoder.requires_grad_(False)
        encoder.eval()
    return encoders


def meta_text_encoders(configs: ModelConfigs, dtype: torch.dtype) -> tuple[Any, Any]:
    with on_meta():
        return clip_text_encoders(configs, dtype)


def meta_vae(configs: ModelConfigs, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    with on_meta():
        vae = torch.nn.Module.to(AutoencoderKL.from_config(configs.vae), dtype=dtype)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """Give a meta module storage: fake tensors under an active ``FakeTensorMode``.

    A quantized weight (a torchao tensor subclass, ``model.base_weights``) has no ``empty_like``:
    it is rebuilt from empty copies of its inner tensors (the int8 values and their scales)."""
    from naruto_lora.models.quantize import is_wrapper

    subclassed = []
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if is_wrapper(param.data):
                subclassed.append((owner, name, param.data))
                delattr(owner, name)
    module.to_empty(device="cpu")
    for owner, name, data in subclassed:
        inner_names, context = data.__tensor_flatten__()
        inner = {n: torch.empty_like(getattr(data, n), device="cpu") for n in inner_names}
        rebuilt = type(data).__tensor_unflatten__(inner, context, data.size(), data.stride())
        owner.register_parameter(name, torch.nn.Parameter(rebuilt, requires_grad=False))
    return module


def noise_scheduler(configs: ModelConfigs) -> Any:
    """The training schedule in DDPM form, as ``models.load_noise_scheduler`` builds it."""
    from diffusers import DDPMScheduler

    with quiet_libraries():
        return DDPMScheduler.from_config(configs.scheduler)


class StandInTokenizer:
    """Token ids of the right shape for prompts, without a vocabulary (the SDXL tokenizer files
    are not here, and memory does not depend on which ids a prompt has)."""

    def __init__(self, model_max_length: int = sdxl_configs.TOKENIZER_MAX_LENGTH) -> None:
        self.model_max_length = model_max_length
        self.added_tokens_encoder: dict[str, int] = {}

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        from types import SimpleNamespace

        count = 1 if isinstance(text, str) else len(text)
        # "longest" padding is the pipeline's truncation check: shorter ids skip its
        # data-dependent comparison, which fake tensors cannot answer.
        length = 2 if kwargs.get("padding") == "longest" else self.model_max_length
        ids = torch.zeros(count, length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def tokenize(self, text: str) -> list[str]:
        return []
