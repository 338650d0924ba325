"""The CPU demo shows real style transfer (issue 7): the "Done when" check.

``nlora train`` trains a LoRA on the toy style set (``nlora:toy-style``) from the committed toy
base (``nlora:toy-base``), with the settings recommended for the ``tiny`` profile. Sampled at a
fixed seed on held-out prompts (scenes the style set leaves out), the LoRA's images must score
far higher on the style score than the base's and still show the caption's shape.

The LoRA is read back through diffusers' own loader (``load_lora_weights``), not our code.

Status: this does not hold yet. The toy base is too narrow (it only ever saw cream
backgrounds); the LoRA learns orange and black ink but, under classifier-free guidance, turns
the scene into a dark red background with an orange blob and loses the caption's shape (numbers
in benchmarks/RESULTS.md, "Style demo (issue 7)"). The test is a strict xfail so that it
runs in CI and reports the day it starts to pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from naruto_lora import style, toy

pytestmark = pytest.mark.slow

# What profiles/tiny.toml should say for the demo (docs/demo.md).
DEMO_SETS = (
    "lora.rank=8",
    "lora.alpha=8",
    "train.batch_size=4",
    "train.max_steps=600",
    "train.learning_rate=1e-3",
    "train.lr_warmup_steps=20",
    "train.checkpoint_every=0",
    "validation.every_steps=0",
    "data.resolution=64",
)
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
        "--model",
        toy.TOY_BASE_ID,
        "--data",
        toy.TOY_STYLE_ID,
        "--output",
        str(work / "run"),
        "--cache-dir",
        str(work / "cache"),
        "--disable",
        "offset_noise",
    ]
    for assignment in DEMO_SETS:
        args += ["--set", assignment]
    result = invoke(CliRunner(), args)
    assert result.exit_code == 0, result.output
    return work / "run"


@pytest.mark.xfail(strict=True, reason="toy base too narrow: the LoRA loses the content (issue 7)")
def test_demo_lora_raises_the_style_score_and_keeps_the_content(demo_lora: Path) -> None:
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
    base = [s for s in scores if s.scale == 0.0]
    lora = [s for s in scores if s.scale == 1.0]
    report = "\n".join(
        f"{s.scale:g} {s.prompt!r}: style {s.style:.3f}, {s.content.summary()}" for s in scores
    )
    print(report)
    base_style = sum(s.style for s in base) / len(base)
    lora_style = sum(s.style for s in lora) / len(lora)
    assert lora_style > base_style + 0.3, report
    assert min(s.style for s in lora) > max(s.style for s in base), report
    # Content: the LoRA keeps what the base draws (at most one held-out scene may slip).
    base_ok = sum(s.content.passed for s in base)
    lora_ok = sum(s.content.passed for s in lora)
    assert lora_ok >= max(base_ok - 1, 1), report
