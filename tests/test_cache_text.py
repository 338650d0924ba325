"""The text-embedding cache against diffusers' own SDXL prompt encoding, on the tiny model whose
encoders are 32 + 48 wide with a 40-dim projection (not SDXL's 768 + 1280 / 1280)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from naruto_lora.cache import ensure_text_cache, text_cache_dir
from naruto_lora.cache.text import TextCache, plan_text_cache
from naruto_lora.util.errors import UserError
from tests._cache_support import copy_subset, make_profile

ATOL = 2e-3


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture()
def data_with_duplicates(tiny_data_dir, tmp_path):
    folder = copy_subset(tiny_data_dir, tmp_path / "data", 6)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    lines[4]["text"] = lines[1]["text"]  # two images, one caption
    lines[5]["text"] = ""  # no caption: encoded as the empty prompt
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder, [x["text"] for x in lines]


def test_cached_embeddings_equal_the_pipeline_encode_prompt(
    data_with_duplicates, tmp_path, tiny_pipeline
):
    folder, captions = data_with_duplicates
    profile = make_profile(folder, tmp_path / "cache")
    cache = ensure_text_cache(profile, batch_size=2)
    assert len(cache) == cache.report.encoded == len(set(captions)) == 5  # duplicates once
    hidden = (
        tiny_pipeline.text_encoder.config.hidden_size
        + tiny_pipeline.text_encoder_2.config.hidden_size
    )
    for caption in captions:
        prompt_embeds, pooled_embeds = cache.embeddings(caption)
        expected, _, expected_pooled, _ = tiny_pipeline.encode_prompt(
            caption, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        assert prompt_embeds.dtype == pooled_embeds.dtype == torch.float16
        assert prompt_embeds.shape == (77, hidden) == (77, 80)
        assert pooled_embeds.shape == (tiny_pipeline.text_encoder_2.config.projection_dim,)
        torch.testing.assert_close(prompt_embeds.float(), expected[0], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pooled_embeds.float(), expected_pooled[0], atol=ATOL, rtol=ATOL)


def test_reuse_invalidation_and_check_only(data_with_duplicates, tmp_path, tiny_model_dir):
    folder, captions = data_with_duplicates
    profile = make_profile(folder, tmp_path / "cache")
    with pytest.raises(UserError, match=r"(?s)5 item\(s\) not cached.*nlora cache text --to-disk"):
        ensure_text_cache(profile, auto=False)
    plan = plan_text_cache(profile)
    assert (plan.captions, plan.items, plan.cached) == (5, 6, 0)
    assert plan.bytes_total == 5 * (77 * 80 + 40) * 2
    assert not text_cache_dir(profile).exists()  # planning writes nothing
    first = ensure_text_cache(profile)
    assert ensure_text_cache(profile, auto=False).report.reused == 5
    assert plan_text_cache(profile).cached == 5

    # A text encoder's weights replaced in place: every caption is stale.
    weights = next((tiny_model_dir / "text_encoder_2").glob("*.safetensors"))
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with pytest.raises(UserError, match="stale"):
            ensure_text_cache(profile, auto=False)
        assert ensure_text_cache(profile).report.encoded == 5
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reopened = TextCache.open(text_cache_dir(profile))
    for caption in captions:
        assert torch.equal(reopened.embeddings(caption)[0], first.embeddings(caption)[0])
    with pytest.raises(UserError, match="no embeddings for the caption"):
        reopened.embeddings("a caption nobody wrote")
