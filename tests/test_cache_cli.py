"""``nlora cache latents|text|info`` through click's CliRunner."""

from __future__ import annotations

import json

from safetensors import safe_open

from naruto_lora.cache.latents import LatentCache
from naruto_lora.cache.text import TextCache
from tests._cache_support import copy_subset
from tests.conftest import invoke
from tests.test_data import bad_folder


def out(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def common(data, cache_dir) -> list[str]:
    return [
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--cache-dir",
        str(cache_dir),
        "--device",
        "cpu",
    ]


def test_cache_commands_end_to_end(cli_runner, tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 5)
    args = common(data, tmp_path / "cache")
    result = invoke(cli_runner, ["cache", "latents", *args, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "0 reused, 5 encoded" in out(result)
    assert "5 reused, 0 encoded" in out(invoke(cli_runner, ["cache", "latents", *args]))

    dry = invoke(cli_runner, ["cache", "text", *args])
    assert dry.exit_code == 0 and "Would cache 5 distinct caption(s) of 5 item(s)" in out(dry)
    assert "77 x 80" in out(dry) and not (tmp_path / "cache" / "text").exists()
    built = invoke(cli_runner, ["cache", "text", *args, "--to-disk"])
    assert built.exit_code == 0 and "5 encoded" in out(built)

    info = invoke(cli_runner, ["cache", "info", str(tmp_path / "cache")])
    assert info.exit_code == 0, info.output
    for needle in (
        "latents",
        "4 x 32 x 32 float16 x 5",
        "77 x 80 float16 x 5",
        "scaling_factor",
        "0.5",
    ):
        assert needle in out(info)

    dump = tmp_path / "item.safetensors"
    shown = invoke(
        cli_runner,
        ["cache", "info", str(tmp_path / "cache" / "latents"), "--item", "2", "--dump", str(dump)],
    )
    assert shown.exit_code == 0, shown.output
    cache = LatentCache.open(tmp_path / "cache" / "latents")
    with safe_open(dump, "pt") as f:
        meta = f.metadata()
        assert meta["source"] == cache.items[2].source and meta["caption"] == cache.items[2].caption
        assert f.get_tensor("latents").equal(cache.stored(2))
        assert tuple(f.get_tensor("original_size").tolist()) == cache.items[2].original_size
        assert tuple(f.get_tensor("crop_top_left").tolist()) == cache.items[2].crop_top_left
        assert tuple(f.get_tensor("target_size").tolist()) == cache.items[2].target_size
    text_dump = tmp_path / "text.safetensors"
    assert (
        invoke(
            cli_runner,
            [
                "cache",
                "info",
                str(tmp_path / "cache" / "text"),
                "--item",
                "0",
                "--dump",
                str(text_dump),
            ],
        ).exit_code
        == 0
    )
    text = TextCache.open(tmp_path / "cache" / "text")
    with safe_open(text_dump, "pt") as f:
        prompt, pooled = text.embeddings(f.metadata()["caption"])
        assert f.get_tensor("prompt_embeds").equal(prompt) and f.get_tensor("pooled_embeds").equal(
            pooled
        )

    both = invoke(cli_runner, ["cache", "info", str(tmp_path / "cache"), "--item", "0"])
    assert both.exit_code == 2 and "holds several caches" in out(both)

    assert "ok (every shard's checksum verified)" in out(info)
    shard = next((tmp_path / "cache" / "text" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    damaged = invoke(cli_runner, ["cache", "info", str(tmp_path / "cache" / "text")])
    assert damaged.exit_code == 0
    assert f"damaged {shard.name}: content checksum mismatch" in out(damaged)


def test_cache_cli_bad_input_messages(cli_runner, tmp_path):
    missing = invoke(
        cli_runner, ["cache", "latents", *common(tmp_path / "nowhere", tmp_path / "c")]
    )
    assert missing.exit_code == 2 and "does not exist" in out(missing)
    assert "Traceback" not in out(missing)

    folder = bad_folder(tmp_path)
    ok = invoke(cli_runner, ["cache", "latents", *common(folder, tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    assert "skipped 7 item(s)" in out(ok) and "truncated.png" in out(ok)
    strict = invoke(cli_runner, ["cache", "latents", *common(folder, tmp_path / "c"), "--strict"])
    assert strict.exit_code == 2 and "--strict" in out(strict)

    not_cache = invoke(cli_runner, ["cache", "info", str(tmp_path)])
    assert not_cache.exit_code == 2 and "is not a cache folder" in out(not_cache)


def test_column_options(cli_runner, tmp_path):
    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_dict(
        {
            "picture": [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(3)],
            "words": ["one", "two", "two"],
        },
        features=datasets.Features(
            {"picture": datasets.Image(), "words": datasets.Value("string")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "d"))
    args = common(tmp_path / "d", tmp_path / "c")
    wrong = invoke(cli_runner, ["cache", "latents", *args])
    assert wrong.exit_code == 2 and "--image-column" in out(wrong)
    right = invoke(
        cli_runner,
        ["cache", "latents", *args, "--image-column", "picture", "--caption-column", "words"],
    )
    assert right.exit_code == 0, right.output
    index = json.loads((tmp_path / "c" / "latents" / "index.json").read_text())
    assert [index["entries"][k]["caption"] for k in index["order"]] == ["one", "two", "two"]
