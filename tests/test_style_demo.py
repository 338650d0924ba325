"""The CPU demo shows real style transfer (issue 7).

The README's first command, ``nlora demo`` on the ``tiny`` profile, trains a LoRA on the toy
style set (``nlora:toy-style``) from the committed toy base (``nlora:toy-base``). Sampled at a
fixed seed on held-out prompts (scenes the style set leaves out), the LoRA's images must score
far higher on the style score than the base's, and still show the caption's shape.

The LoRA is read back through diffusers' own loader (``load_lora_weights``), not our code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from naruto_lora import style, toy

pytestmark = pytest.mark.slow

DEMO_STEPS = None  # the profile's own max_steps: the test checks what the README's command does


def _missing_phases() -> list[str]:
    from naruto_lora.cli import cli

    return [name for name in ("cache", "train", "sample", "demo") if name not in cli.commands]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory, nlora_home: Path) -> Path:
    from click.testing import CliRunner

    from tests.conftest import invoke

    missing = _missing_phases()
    if missing:
        pytest.skip(f"`nlora {'/'.join(missing)}` not in this build yet")
    work = tmp_path_factory.mktemp("style-demo")
    args = [
        "demo",
        "--profile",
        "tiny",
        "--output",
        str(work / "run"),
        "--cache-dir",
        str(work / "cache"),
    ]
    args += [a for prompt in toy.HELD_OUT_PROMPTS for a in ("--prompt", prompt)]
    if DEMO_STEPS:
        args += ["--steps", str(DEMO_STEPS)]
    result = invoke(CliRunner(), args)
    assert result.exit_code == 0, result.output
    return work / "run"


def test_tiny_profile_uses_the_toy_base_and_style_set() -> None:
    from naruto_lora.profile import load_profile

    profile = load_profile("tiny")
    assert profile.model.pretrained == toy.TOY_BASE_ID
    assert profile.data.source == toy.TOY_STYLE_ID
    # The validation prompts are held out, so the grid shows the style carried to new scenes.
    assert all(toy.is_held_out(toy.parse_caption(p)) for p in profile.validation.prompts)


def test_demo_lora_raises_the_style_score_and_keeps_the_content(demo_output: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    pipe.load_lora_weights(str(demo_output))
    pipe.set_progress_bar_config(disable=True)
    scores = style.score_samples(pipe, list(toy.HELD_OUT_PROMPTS), scales=(0.0, 1.0), seed=0)
    base = [s for s in scores if s.scale == 0.0]
    lora = [s for s in scores if s.scale == 1.0]
    base_style = sum(s.style for s in base) / len(base)
    lora_style = sum(s.style for s in lora) / len(lora)
    report = "\n".join(
        f"{s.scale:g} {s.prompt!r}: style {s.style:.3f}, {s.content.summary()}" for s in scores
    )
    assert lora_style > base_style + 0.3, report
    assert min(s.style for s in lora) > max(s.style for s in base), report
    # Content: the LoRA keeps what the base draws (at most one held-out scene may slip).
    base_ok = sum(s.content.passed for s in base)
    lora_ok = sum(s.content.passed for s in lora)
    assert lora_ok >= max(base_ok - 1, 1), report
    assert any(demo_output.glob("compare/*.png")), "sample --compare wrote no grid"
