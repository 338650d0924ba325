"""Data sources, bad inputs, preprocessing, buckets and SDXL time ids (no model needed)."""

from __future__ import annotations

import io
import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naruto_lora.data.sources import (
    ImageError,
    bucket_for,
    image_size,
    load_rgb,
    plan_crop,
    plan_items,
    preprocess,
    scan_source,
    time_ids,
)
from naruto_lora.util.errors import UserError
from tests._cache_support import write_imagefolder


def data_cfg(source: str = "", **kw):
    from naruto_lora.config.profile import DataConfig

    return DataConfig(source=source, **kw)


def noise_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4, "LA": 2}[mode]
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


# --------------------------------------------------------------------------- time ids


def test_time_ids_follow_the_sdxl_pipeline_convention():
    from diffusers import StableDiffusionXLPipeline

    # The pipeline method only needs the UNet's embedding sizes: give it a stand-in.
    unet = types.SimpleNamespace(
        config=types.SimpleNamespace(addition_time_embed_dim=8),
        add_embedding=types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=6 * 8 + 40)),
    )
    fake = types.SimpleNamespace(unet=unet)
    reference = StableDiffusionXLPipeline._get_add_time_ids(
        fake, (600, 900), (12, 34), (512, 768), torch.float32, text_encoder_projection_dim=40
    )
    assert torch.equal(time_ids((600, 900), (12, 34), (512, 768)), reference[0])
    with pytest.raises(ValueError):
        time_ids((1, 2), (3,), (4, 5))


# --------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("size", "bucket"),
    [  # SDXL's published training buckets, from images twice as large
        ((2048, 2048), (1024, 1024)),
        ((1792, 2304), (896, 1152)),
        ((1664, 2432), (832, 1216)),
        ((1536, 2688), (768, 1344)),
        ((1280, 3072), (640, 1536)),
        ((2688, 1536), (1344, 768)),
    ],
)
def test_buckets_reproduce_sdxl_buckets(size, bucket):
    assert bucket_for(*size, resolution=1024) == bucket


def test_buckets_never_upscale_and_keep_area():
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(64, 3000), rng.randint(64, 3000)
        res = rng.choice([512, 768, 1024])
        bh, bw = bucket_for(h, w, res)
        assert bh % 64 == 0 and bw % 64 == 0
        assert bh <= h and bw <= w, "a bucket larger than the image means upscaling"
        assert bh * bw <= min(res * res, h * w)
        assert bucket_for(w, h, res) == (bw, bh)  # a transposed image, the transposed bucket
        if min(h, w) >= res and max(h, w) <= 4 * min(h, w):
            # About resolution^2: 64 px steps cost at most a side's step (x2 sides).
            assert bh * bw >= (1 - 2 * 64 / res) * res * res
    assert bucket_for(63, 500, 1024) is None
    assert bucket_for(4000, 100, 1024) == (256, 64)  # capped at 4:1


# --------------------------------------------------------------------------- crop plans


def test_plan_resizes_short_side_and_center_crops():
    plan = plan_crop((300, 500), data_cfg(resolution=100), seed=0, key="a")
    assert plan.resized_size == (100, 167) and plan.target_size == (100, 100)
    assert plan.crop_box_top_left == (0, 33) and plan.crop_top_left == (0, 33)


def test_random_crop_is_seeded_per_item_and_flip_mirrors_the_crop():
    cfg = data_cfg(resolution=100, center_crop=False)
    plans = {s: plan_crop((300, 500), cfg, seed=s, key="a") for s in range(20)}
    assert plan_crop((300, 500), cfg, seed=3, key="a") == plans[3]
    assert len({p.crop_box_top_left for p in plans.values()}) > 1
    for p in plans.values():
        assert 0 <= p.crop_box_top_left[1] <= 67 and p.crop_box_top_left[0] == 0
    flipped = plan_crop((300, 500), cfg, seed=3, key="a", flip=True)
    top, left = plans[3].crop_box_top_left
    assert flipped.crop_top_left == (top, 167 - left - 100)


def test_buckets_plan_crops_inside_the_image():
    plan = plan_crop((300, 500), data_cfg(resolution=256, buckets=True), seed=0, key="a")
    bh, bw = plan.target_size
    assert (bh, bw) == bucket_for(300, 500, 256)
    assert plan.resized_size[0] <= 300 and plan.resized_size[1] <= 500  # no upscaling
    with pytest.raises(ImageError, match="too small"):
        plan_crop((40, 500), data_cfg(resolution=256, buckets=True), seed=0, key="a")


@pytest.mark.parametrize("flip", [False, True])
def test_preprocess_matches_an_independent_resize_crop(flip):
    image = noise_image(90, 130, seed=1)
    plan = plan_crop(
        (90, 130), data_cfg(resolution=64, center_crop=False), seed=5, key="k", flip=flip
    )
    out = preprocess(image, plan)
    big = np.asarray(image.resize((plan.resized_size[1], plan.resized_size[0]), Image.LANCZOS))
    top, left = plan.crop_box_top_left
    ref = big[top : top + 64, left : left + 64].astype(np.float32)
    if flip:
        ref = ref[:, ::-1]
    ref = torch.from_numpy(ref.copy()).permute(2, 0, 1) / 127.5 - 1
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert out.min() >= -1 and out.max() <= 1


# --------------------------------------------------------------------------- images


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_colour_modes_are_converted_not_refused():
    cmyk = noise_image(8, 8, mode="CMYK")
    assert np.array_equal(
        np.asarray(load_rgb(encoded(cmyk, "JPEG", quality=100))),
        np.asarray(Image.open(io.BytesIO(encoded(cmyk, "JPEG", quality=100))).convert("RGB")),
    )
    grey = load_rgb(encoded(noise_image(8, 8, mode="L")))
    array = np.asarray(grey)
    assert grey.mode == "RGB" and np.array_equal(array[..., 0], array[..., 2])
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (200, 0, 0, 0))  # fully transparent: must become white paper
    out = np.asarray(load_rgb(encoded(rgba)))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 20, 30)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(load_rgb(encoded(sixteen))).min() == 255


def test_truncated_and_empty_images_raise_image_error():
    data = encoded(noise_image(64, 64))
    assert image_size(data[: len(data) // 2]) == (64, 64)  # the header still reads...
    with pytest.raises(ImageError):
        load_rgb(data[: len(data) // 2])  # ...the pixels do not
    with pytest.raises(ImageError, match="0 bytes"):
        image_size(b"")
    with pytest.raises(ImageError):
        image_size(b"not an image at all")


def test_exif_orientation_is_applied():
    image = noise_image(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 40 high, 20 wide
    data = encoded(image, "JPEG", exif=exif)
    assert image_size(data) == (40, 20)
    assert load_rgb(data).size == (20, 40)


# --------------------------------------------------------------------------- sources


def test_imagefolder_source(tiny_data_dir):
    scan = scan_source(data_cfg(str(tiny_data_dir)))
    lines = [json.loads(x) for x in (tiny_data_dir / "metadata.jsonl").read_text().splitlines()]
    assert [i.key for i in scan.items] == [x["file_name"] for x in lines]
    assert [i.caption for i in scan.items] == [x["text"] for x in lines]
    assert scan.items[3].blob.read() == (tiny_data_dir / lines[3]["file_name"]).read_bytes()
    assert len(scan_source(data_cfg(str(tiny_data_dir), max_items=5)).items) == 5


def test_text_caption_folder_source(tmp_path):
    for name in ("b.png", "a.png", "sub/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        noise_image(16, 16).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("first caption\n")
    (tmp_path / "sub" / "c.txt").write_text("third")
    scan = scan_source(data_cfg(str(tmp_path)))
    assert [(i.key, i.caption) for i in scan.items] == [
        ("a.png", "first caption"),
        ("b.png", ""),
        ("sub/c.jpg", "third"),
    ]
    assert any("no caption" in w and "b.png" in w for w in scan.warnings)


def _hf_dataset(n: int, image_column: str = "image", caption_column: str = "text"):
    import datasets

    images = [noise_image(16, 24, seed=i) for i in range(n)]
    return images, datasets.Dataset.from_dict(
        {image_column: images, caption_column: [f"caption {i}" for i in range(n)]},
        features=datasets.Features(
            {image_column: datasets.Image(), caption_column: datasets.Value("string")}
        ),
    )


def test_saved_dataset_and_parquet_sources(tmp_path):
    import datasets

    images, ds = _hf_dataset(3)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for folder in ("saved", "dict", "pq"):
        scan = scan_source(data_cfg(str(tmp_path / folder)))
        assert [i.caption for i in scan.items] == ["caption 0", "caption 1", "caption 2"]
        decoded = load_rgb(scan.items[2].blob.read())
        assert np.array_equal(np.asarray(decoded), np.asarray(images[2]))
    with pytest.raises(UserError, match="no split 'valid'"):
        scan_source(data_cfg(str(tmp_path / "dict"), split="valid"))


def test_custom_and_wrong_columns(tmp_path):
    _, ds = _hf_dataset(2, "img", "caption")
    ds.save_to_disk(str(tmp_path / "d"))
    scan = scan_source(data_cfg(str(tmp_path / "d"), image_column="img", caption_column="caption"))
    assert len(scan.items) == 2
    with pytest.raises(UserError, match=r"no column 'image'.*img, caption"):
        scan_source(data_cfg(str(tmp_path / "d")))


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="Could not load the data set 'nobody/no-such-set"):
        scan_source(data_cfg("nobody/no-such-set-xyz"))


# --------------------------------------------------------------------------- bad inputs


def bad_folder(tmp_path: Path) -> Path:
    folder = write_imagefolder(
        tmp_path / "data",
        {
            "good.png": noise_image(32, 32),
            "grey.png": noise_image(32, 32, mode="L"),
            "alpha.png": noise_image(32, 32, mode="RGBA"),
            "nocap.png": noise_image(32, 32),
        },
        captions={"nocap.png": None},
    )
    noise_image(32, 32).convert("CMYK").save(folder / "cmyk.jpg")
    data = encoded(noise_image(64, 64, seed=3))
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"this is not a picture")
    noise_image(32, 32).save(tmp_path / "outside.png")  # exists, must still be refused
    extra = [
        {"file_name": "cmyk.jpg", "text": "cmyk"},
        {"file_name": "truncated.png", "text": "cut"},
        {"file_name": "empty.png", "text": "nothing"},
        {"file_name": "garbage.png", "text": "junk"},
        {"file_name": "../outside.png", "text": "escape"},
        {"file_name": str(tmp_path / "outside.png"), "text": "absolute"},
        {"file_name": "missing.png", "text": "gone"},
    ]
    with open(folder / "metadata.jsonl", "a") as fh:
        fh.write("\n".join(json.dumps(x) for x in extra) + "\n{broken json\n")
    return folder


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    folder = bad_folder(tmp_path)
    scan = scan_source(data_cfg(str(folder), resolution=64))
    reasons = {s.key: s.reason for s in scan.skipped}
    assert "0 bytes" in reasons["empty.png"]
    assert "escapes" in reasons["../outside.png"]
    assert "escapes" in reasons[str(tmp_path / "outside.png")]
    assert "not found" in reasons["missing.png"]
    assert any("JSON" in r for r in reasons.values())
    assert {i.key for i in scan.items} == {
        "good.png",
        "grey.png",
        "alpha.png",
        "nocap.png",
        "cmyk.jpg",
        "truncated.png",
        "garbage.png",
    }
    assert next(i for i in scan.items if i.key == "nocap.png").caption == ""
    assert any("nocap.png" in w for w in scan.warnings)
    planned, skipped = plan_items(scan.items, data_cfg(resolution=64), seed=0)
    # Headers are read when planning; a truncated file still has one (it fails on decoding).
    assert [(s.key, "not a readable image" in s.reason) for s in skipped] == [("garbage.png", True)]
    assert len(planned) == 6
    with pytest.raises(UserError, match="--strict"):
        scan_source(data_cfg(str(folder)), strict=True)


def test_empty_and_unusable_data_sets_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        scan_source(data_cfg(str(tmp_path / "empty")))
    (tmp_path / "nolines").mkdir()
    (tmp_path / "nolines" / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        scan_source(data_cfg(str(tmp_path / "nolines")))
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="No usable item"):
        scan_source(data_cfg(str(tmp_path / "zero")))
    with pytest.raises(UserError, match="does not exist"):
        scan_source(data_cfg(str(tmp_path / "nowhere")))
    folder = write_imagefolder(tmp_path / "cap", {"a.png": noise_image(8, 8)})
    with pytest.raises(UserError, match="caption field 'words'"):
        scan_source(data_cfg(str(folder), caption_column="words"))
