"""Loading the parts of an SDXL model from a hub id, a local diffusers folder, or an ``nlora:`` id.

Everything model-specific (latent channels, VAE downscale factor, ``scaling_factor``, hidden sizes,
sample size, prediction type) is read from the loaded configs, never assumed to be SDXL's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naruto_lora.models import registry
from naruto_lora.util.errors import UserError


def resolve_model(model_id: str) -> str:
    """A local folder path or a hub id; an ``nlora:`` id is looked up in ``models.registry``
    (the demo's models: built on first use, or shipped as package data)."""
    builtin = registry.lookup(model_id, "model")
    if builtin is not None:
        return builtin.resolve()
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise UserError(
                f"'{path}' is a folder but not a diffusers model: it has no model_index.json or config.json.",
                hint="Point --model/--vae at a diffusers folder (save_pretrained layout) or a hub id.",
            )
        return str(path)
    if model_id.startswith((".", "/", "~")):
        raise UserError(f"Model folder '{model_id}' does not exist.")
    return model_id


def resolve_data(source: str) -> str:
    """A data set's path or hub id; an ``nlora:`` id is looked up in ``models.registry``."""
    builtin = registry.lookup(source, "data")
    return source if builtin is None else builtin.resolve()


def _load(loader: Any, model_id: str, what: str, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn "not found / no network" into a clear user error."""
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renamed torch_dtype to dtype; older releases we support lack dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return loader.from_pretrained(model_id, **kwargs)
    except Exception as exc:
        sub = kwargs.get("subfolder")
        where = f"'{model_id}'" + (f" (subfolder '{sub}')" if sub else "")
        refused = _unsafe_pickle_in(exc, f"The {what} file in {where}")
        if refused is not None:
            raise refused from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        raise UserError(
            f"Could not load the {what} from {where}: {str(exc).splitlines()[0]}",
            hint="Check the id or path; for a hub id you need network access or a filled hub cache "
            "(unset HF_HUB_OFFLINE, or run `hf download ID` once). "
            "`nlora doctor` shows what is available.",
        ) from exc


def _unsafe_pickle_in(exc: BaseException, where: str) -> UserError | None:
    """diffusers wraps torch's refusal of a code-running pickle in an OSError: find it."""
    from naruto_lora.util.errors import unsafe_pickle

    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        found = unsafe_pickle(seen, where) if isinstance(seen, Exception) else None
        if found is not None:
            return found
        seen = seen.__cause__ or seen.__context__
    return None


def _common(profile_model: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if profile_model.revision:
        kwargs["revision"] = profile_model.revision
    if profile_model.variant:
        kwargs["variant"] = profile_model.variant
    return kwargs


def load_unet(model_cfg: Any, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    model_id = resolve_model(model_cfg.pretrained)
    unet = _load(
        UNet2DConditionModel,
        model_id,
        "UNet",
        subfolder="unet",
        torch_dtype=dtype,
        **_common(model_cfg),
    )
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(
            f"'{model_cfg.pretrained}' is not an SDXL-architecture model: its UNet has "
            f"addition_embed_type={unet.config.addition_embed_type!r}, not 'text_time'.",
            hint="naruto-lora trains SDXL LoRAs; use an SDXL base model.",
        )
    return unet


def load_vae(model_cfg: Any, dtype: torch.dtype = torch.float32):
    """The profile's VAE (a separate repo/folder), or the model's own when ``vae`` is empty."""
    from diffusers import AutoencoderKL

    if model_cfg.vae:
        return _load(AutoencoderKL, resolve_model(model_cfg.vae), "VAE", torch_dtype=dtype)
    return _load(
        AutoencoderKL,
        resolve_model(model_cfg.pretrained),
        "VAE",
        subfolder="vae",
        torch_dtype=dtype,
        **_common(model_cfg),
    )


def vae_is_fp16_safe(model_cfg: Any, vae: Any) -> bool:
    """SDXL's original VAE overflows in fp16; the fp16-fix VAE (and configs that say so) do not."""
    if getattr(vae.config, "force_upcast", True) is False:
        return True
    return "fp16-fix" in (model_cfg.vae or "").lower()


@dataclass
class TextEncoders:
    tokenizers: tuple[Any, Any]
    encoders: tuple[Any, Any]


def load_text_encoders(model_cfg: Any, dtype: torch.dtype = torch.float32) -> TextEncoders:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_id = resolve_model(model_cfg.pretrained)
    common = _common(model_cfg)
    tok1 = _load(
        CLIPTokenizer,
        model_id,
        "tokenizer",
        subfolder="tokenizer",
        **{k: v for k, v in common.items() if k == "revision"},
    )
    tok2 = _load(
        CLIPTokenizer,
        model_id,
        "second tokenizer",
        subfolder="tokenizer_2",
        **{k: v for k, v in common.items() if k == "revision"},
    )
    enc1 = _load(
        CLIPTextModel,
        model_id,
        "text encoder",
        subfolder="text_encoder",
        torch_dtype=dtype,
        **common,
    )
    enc2 = _load(
        CLIPTextModelWithProjection,
        model_id,
        "second text encoder",
        subfolder="text_encoder_2",
        torch_dtype=dtype,
        **common,
    )
    for enc in (enc1, enc2):
        enc.requires_grad_(False)
        enc.eval()
    return TextEncoders(tokenizers=(tok1, tok2), encoders=(enc1, enc2))


@torch.no_grad()
def encode_prompts(
    text: TextEncoders, captions: list[str], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: the concatenated penultimate hidden states of both encoders, and the
    second encoder's projected pooled output (what ``StableDiffusionXLPipeline.encode_prompt`` does)."""
    hidden = []
    pooled = None
    for tokenizer, encoder in zip(text.tokenizers, text.encoders, strict=True):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # for the projection model: text_embeds (the projected pooled output)
    return torch.cat(hidden, dim=-1), pooled


def force_zeros_for_empty_prompt(model_cfg: Any) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (``model_index.json``): True means SDXL's
    pipeline conditions an empty (negative) prompt on zeros, not on the encoded empty string.
    True when the model does not say, as ``StableDiffusionXLPipeline`` defaults."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(
            resolve_model(model_cfg.pretrained),
            **{k: v for k, v in _common(model_cfg).items() if k == "revision"},
        )
    except (OSError, ValueError):
        return True
    return bool(config.get("force_zeros_for_empty_prompt", True))


def empty_prompt_embeddings(
    model_cfg: Any, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the SDXL pipeline conditions on for an empty prompt, as ``([1, seq, D], [1, P])``;
    None when that is zeros (``force_zeros_for_empty_prompt``), so no encoder is loaded."""
    if force_zeros_for_empty_prompt(model_cfg):
        return None
    text = load_text_encoders(model_cfg, torch.float32)
    with torch.no_grad():
        prompt, pooled = encode_prompts(text, [""], "cpu")
    return prompt.to(device, dtype), pooled.to(device, dtype)


def load_noise_scheduler(model_cfg: Any):
    """The training noise schedule from the model's own scheduler config (DDPM form)."""
    from diffusers import DDPMScheduler

    return _load(
        DDPMScheduler,
        resolve_model(model_cfg.pretrained),
        "noise scheduler",
        subfolder="scheduler",
        **{k: v for k, v in _common(model_cfg).items() if k == "revision"},
    )


def latent_scale(vae: Any) -> tuple[int, float, float]:
    """(downscale factor, scaling_factor, shift_factor) from the VAE's config."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return factor, float(vae.config.scaling_factor), float(shift)
