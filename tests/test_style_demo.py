"""The CPU demo shows real style transfer (issue 15): the "Done when" check.

``nlora train -p tiny`` trains a LoRA on the toy style set (``nlora:toy-style``: an orange
background and thick black ink) from the committed toy base (``nlora:toy-base``), with the
``tiny`` profile's own settings. Sampled at a fixed seed on held-out prompts (scenes the style set
leaves out), the LoRA's images must show the style (mean style score >= 0.6, every LoRA image
above every base image) and still show the caption's content (at least the base's count minus
one, and at least 3 of 4).

The LoRA is read back through diffusers' own loader (``load_lora_weights``), not our code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from naruto_lora.demo import style, toy
from naruto_lora.plugins.manager import load_profile

pytestmark = pytest.mark.slow

# Only where files go and what is skipped: validation and checkpoints do not change the weights.
RUN_SETS = ("train.checkpoint_every=0", "validation.every_steps=0")
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory: pytest.TempPathFactory, nlora_home: Path) -> Path:
    from click.testing import CliRunner

    from tests.conftest import invoke

    work = tmp_path_factory.mktemp("style-demo")
    args = [
        "train",
        "-p",
        "tiny",
        "--device",
        "cpu",
        "--output",
        str(work / "run"),
        "--cache-dir",
        str(work / "cache"),
    ]
    for assignment in RUN_SETS:
        args += ["--set", assignment]
    result = invoke(CliRunner(), args)
    assert result.exit_code == 0, result.output
    return work / "run"


@pytest.fixture(scope="module")
def demo_scores(demo_lora: Path):
    """Base (LoRA scale 0) and LoRA (scale 1) images of the held-out prompts, scored."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    pipe.load_lora_weights(str(demo_lora))
    pipe.set_progress_bar_config(disable=True)
    scores = style.score_samples(
        pipe, list(toy.HELD_OUT_PROMPTS), scales=(0.0, 1.0), seed=0, guidance=GUIDANCE
    )
    report = "\n".join(
        f"{s.scale:g} {s.prompt!r}: style {s.style:.3f}, {s.content.summary()}" for s in scores
    )
    print(report)
    return [s for s in scores if s.scale == 0.0], [s for s in scores if s.scale == 1.0], report


def test_demo_lora_shows_the_style_on_held_out_prompts(demo_scores) -> None:
    base, lora, report = demo_scores
    assert sum(s.style for s in lora) / len(lora) >= 0.6, report
    assert min(s.style for s in lora) > max(s.style for s in base), report


def test_demo_lora_keeps_the_content(demo_scores) -> None:
    base, lora, report = demo_scores
    # At most one held-out scene may slip, and at least 3 of 4 must pass.
    base_ok = sum(s.content.passed for s in base)
    lora_ok = sum(s.content.passed for s in lora)
    assert lora_ok >= max(base_ok - 1, 3), report


def test_tiny_profile_is_the_demo() -> None:
    """The README's first command trains what this test checks: the toy base and style set."""
    profile = load_profile("tiny")
    assert profile.model.pretrained == toy.TOY_BASE_ID
    assert profile.data.source == toy.TOY_STYLE_ID
    assert set(profile.validation.prompts) == set(toy.HELD_OUT_PROMPTS)
    assert profile.validation.guidance_scale == GUIDANCE
