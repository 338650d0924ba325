"""The style score and the content check, on drawn images: generator scenes and hand-made arrays."""

from __future__ import annotations

import random

import numpy as np
import pytest

from naruto_lora.demo import style, toy


def _scenes(step: int = 1) -> list[toy.Scene]:
    return toy.all_scenes()[::step]


def test_style_score_is_the_palette_share_of_a_hand_made_image() -> None:
    image = np.full((8, 8, 3), 255, dtype=np.uint8)  # white: in no style colour
    image[:4] = toy.STYLE_BACKGROUND  # half orange
    image[4:6] = (0, 0, 0)  # a quarter black ink
    assert style.style_score(image) == pytest.approx(0.75)
    assert style.style_components(image) == {"orange_share": 0.5, "ink_share": 0.25}


def test_style_score_separates_plain_from_styled_scenes() -> None:
    rng = random.Random(3)
    plain = [style.style_score(toy.draw(s, jitter=rng)) for s in _scenes()]
    styled = [style.style_score(toy.draw(s, styled=True, jitter=rng)) for s in _scenes()]
    assert max(plain) < 0.05
    assert min(styled) > 0.6
    # The ink alone (outlines) also separates them: plain scenes have none.
    assert all(
        style.style_components(toy.draw(s, styled=True))["ink_share"] > 0.02 for s in _scenes(7)
    )


@pytest.mark.parametrize("styled", [False, True])
def test_content_check_passes_for_the_right_caption_and_fails_for_wrong_ones(styled: bool) -> None:
    rng = random.Random(4)
    for scene in _scenes(2):
        image = toy.draw(scene, styled=styled, jitter=rng)
        assert style.content_check(image, scene.caption).passed, (scene, styled)
        other_colour = next(c for c in toy.COLOURS if c != scene.colour)
        other_shape = next(s for s in toy.SHAPES if s != scene.shape)
        other_side = {"left": "right", "right": "left", "center": "left"}[scene.position]
        result = style.content_check(image, scene.caption)
        assert result.position_ok, (scene, styled, result.summary())
        wrong = [
            scene.caption.replace(scene.colour, other_colour),
            scene.caption.replace(scene.shape, other_shape),
        ]
        for caption in wrong:
            assert not style.content_check(image, caption).passed, (scene, caption)
        moved = toy.Scene(scene.shape, scene.colour, other_side, scene.size).caption
        assert not style.content_check(image, moved).position_ok, (scene, moved)


def test_content_check_classifies_hand_made_shapes() -> None:
    """Shapes drawn with numpy (not the generator): a square, a disc, an upright triangle."""
    size, blue = 64, toy.COLOURS["blue"]
    y, x = np.mgrid[0:size, 0:size] + 0.5
    masks = {
        "square": (abs(x - 20) < 10) & (abs(y - 32) < 10),
        "circle": (x - 20) ** 2 + (y - 32) ** 2 < 12**2,
        "triangle": (y > 20) & (y < 44) & (abs(x - 20) < (y - 20) / 2),
    }
    for shape, mask in masks.items():
        image = np.full((size, size, 3), 230, dtype=np.uint8)
        image[mask] = blue
        result = style.content_check(image, f"a big blue {shape} on the left")
        assert result.passed, (shape, result.summary())
        assert result.shape == shape


def test_content_check_fails_on_an_empty_image() -> None:
    blank = np.full((64, 64, 3), 230, dtype=np.uint8)
    result = style.content_check(blank, "a big red circle in the center")
    assert not result.passed
    assert result.colour_share == 0.0


def test_content_check_rejects_a_caption_that_is_no_scene() -> None:
    with pytest.raises(ValueError, match="not a toy scene"):
        style.content_check(np.zeros((8, 8, 3)), "a ninja with spiky hair")
