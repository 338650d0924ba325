"""The committed toy base model (``nlora:toy-base``): an SDXL-architecture pipeline that draws
its captions. Loaded through diffusers' own pipeline class, sampled at a fixed seed."""

from __future__ import annotations

import json

import pytest
import torch

from naruto_lora.demo import style, toy

# Seen captions (the base was trained on every plain scene) and the held-out prompts.
PROMPTS = [
    *toy.HELD_OUT_PROMPTS,
    "a small purple square on the right",
    "a big green triangle on the left",
    "a big yellow circle in the center",
    "a small red triangle on the right",
]
GATE_CONTENT_PASSES = 7  # of 8: issue 15's gate
MEASURED_CONTENT_PASSES = 7  # what the committed weights draw (benchmarks/RESULTS.md)
MAX_HELD_OUT_STYLE = 0.1  # the base's own look stays off the style: a LoRA must add it


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_base_is_sdxl_architecture_with_its_own_latent_numbers(toy_pipe) -> None:
    from naruto_lora.models.loading import latent_scale

    assert toy_pipe.unet.config.addition_embed_type == "text_time"
    factor, scaling, _ = latent_scale(toy_pipe.vae)
    assert factor == 4
    assert scaling != pytest.approx(0.13025)  # its own, from its latents' spread
    assert toy_pipe.unet.config.sample_size * factor == toy.RESOLUTION
    scheduler = json.loads((toy.toy_base_dir() / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["prediction_type"] == "epsilon"


@pytest.fixture(scope="module")
def base_scores(toy_pipe):
    """At the demo's guidance and seed, the 8 prompts in one batch."""
    return style.score_samples(toy_pipe, PROMPTS, scales=(0.0,), seed=0, guidance=5.0)


def _report(scores) -> str:
    return "\n".join(f"{s.prompt!r}: style {s.style:.3f}, {s.content.summary()}" for s in scores)


def test_toy_base_draws_its_captions_without_the_style(base_scores) -> None:
    """The caption's colour and shape in 6 of 8 prompts (measured), and on the held-out prompts a
    mean style score of at most 0.1."""
    assert sum(s.content.passed for s in base_scores) >= MEASURED_CONTENT_PASSES, _report(
        base_scores
    )
    held_out = [s.style for s in base_scores if s.prompt in toy.HELD_OUT_PROMPTS]
    assert len(held_out) == len(toy.HELD_OUT_PROMPTS)
    assert sum(held_out) / len(held_out) <= MAX_HELD_OUT_STYLE, _report(base_scores)


def test_toy_base_draws_seven_of_eight_captions(base_scores) -> None:
    assert sum(s.content.passed for s in base_scores) >= GATE_CONTENT_PASSES, _report(base_scores)
