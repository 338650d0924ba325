"""The published configs of Stable Diffusion XL base 1.0, as data.

These are copies of the ``config.json`` files of ``stabilityai/stable-diffusion-xl-base-1.0``
(``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``, ``scheduler/``) and of the VAE
``madebyollin/sdxl-vae-fp16-fix``. They are used ONLY by the VRAM planner and the benchmarks, to
build the full-size architecture (with no weights) when no model folder is given and the hub cache
holds no copy. Everything else in naruto-lora reads the configs of the model it actually loads.

Known facts these configs reproduce (checked by tests/test_plan_configs.py):

* the UNet has 2,567,463,684 parameters (5.13 GB in fp16/bf16);
* LoRA rank 16 on ``to_q, to_k, to_v, to_out.0`` adds 23,224,320 trainable parameters, rank 8
  adds 11,612,160;
* the two CLIP text encoders hold about 0.82 B parameters.
"""

from __future__ import annotations

from typing import Any

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FP16_FIX_VAE_ID = "madebyollin/sdxl-vae-fp16-fix"

UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# CLIP ViT-L/14 text tower (OpenAI).
TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14 text tower, with its text projection.
TEXT_ENCODER_2: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The fp16-fix VAE has the same architecture and scale; only its activations stay in fp16 range.
VAE_FP16_FIX: dict[str, Any] = {**VAE, "force_upcast": False}

SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TOKENIZER_MAX_LENGTH = 77

# Where each config lives in a diffusers model folder.
SUBFOLDERS = {
    "unet": ("unet", "config.json"),
    "text_encoder": ("text_encoder", "config.json"),
    "text_encoder_2": ("text_encoder_2", "config.json"),
    "vae": ("vae", "config.json"),
    "scheduler": ("scheduler", "scheduler_config.json"),
}


def published_configs(fp16_fix_vae: bool = True) -> dict[str, dict[str, Any]]:
    """Fresh copies of the published SDXL configs, keyed like ``SUBFOLDERS``."""
    import copy

    return copy.deepcopy(
        {
            "unet": UNET,
            "text_encoder": TEXT_ENCODER,
            "text_encoder_2": TEXT_ENCODER_2,
            "vae": VAE_FP16_FIX if fp16_fix_vae else VAE,
            "scheduler": SCHEDULER,
        }
    )
