"""``nlora export``: each format loads through the loaders its users run with every key matched,
and fuses into the same UNet as the training output; metadata, dtypes, bad inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from naruto_lora.export.writers import export_lora
from naruto_lora.lora.inject import WEIGHT_NAME
from naruto_lora.plugins.manager import load_profile
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.lora_factory import make_output


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A training output, alpha 2 != rank 4, with EMA weights and a checkpoint."""
    folder = tmp_path_factory.mktemp("runs") / "naruto-tiny"
    make_output(folder, tiny_model_dir, rank=4, alpha=2.0, ema=True, checkpoint_step=20)
    return folder


def training_modules(folder: Path) -> set[str]:
    with safe_open(str(folder / WEIGHT_NAME), "pt") as fh:
        return {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in fh.keys()}  # noqa: SIM118


def unet_output(unet) -> torch.Tensor:
    """The UNet on fixed random inputs shaped from its own config."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    hidden = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_dim, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}  # fmt: skip
    with torch.no_grad():
        return unet(sample, 500, hidden, added_cond_kwargs=added).sample


def lora_layers(unet) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix("base_model.model.")
        for n, m in unet.named_modules()
        if isinstance(m, LoraLayer)
    }


def pipeline(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)


@pytest.fixture(scope="module")
def reference(run, tiny_model_dir) -> dict[str, torch.Tensor]:
    """UNet outputs of the base model and of the training output fused through diffusers."""
    pipe = pipeline(tiny_model_dir)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(run))
    assert lora_layers(pipe.unet) == training_modules(run)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    return {"base": base, "lora": unet_output(pipe.unet)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max()


def export_cli(cli_runner, run: Path, out: Path, *args: str):
    result = invoke(cli_runner, ["export", "--lora", str(run), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_file_loads_in_diffusers_and_fuses_like_the_training_output(
    fmt, run, tiny_model_dir, tmp_path, cli_runner, reference
):
    out = tmp_path / f"export-{fmt}.safetensors"
    export_cli(cli_runner, run, out, "--format", fmt, "--dtype", "fp32")
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert lora_layers(pipe.unet) == training_modules(run)  # every key matched, none missing
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    fused = unet_output(pipe.unet)
    assert_close(fused, reference["lora"], rel=1e-5)
    assert (fused - reference["base"]).abs().max() > 1e-2  # the LoRA matters


def test_peft_folder_loads_in_peft_and_diffusers(
    run, tiny_model_dir, tmp_path, cli_runner, reference
):
    from peft import PeftModel

    out = tmp_path / "peft"
    export_cli(cli_runner, run, out, "--format", "peft", "--dtype", "fp32")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 2.0)

    peft_model = PeftModel.from_pretrained(pipeline(tiny_model_dir).unet, str(out))
    assert lora_layers(peft_model) == training_modules(run)
    assert_close(unet_output(peft_model.merge_and_unload()), reference["lora"], rel=1e-5)

    unet = pipeline(tiny_model_dir).unet
    unet.load_lora_adapter(
        str(out), weight_name="adapter_model.safetensors", prefix="base_model.model"
    )
    assert lora_layers(unet) == training_modules(run)
    unet.fuse_lora()
    assert_close(unet_output(unet), reference["lora"], rel=1e-5)


def test_fp16_kohya_file_is_fp16_and_close(run, tiny_model_dir, tmp_path, cli_runner, reference):
    out = tmp_path / "half.safetensors"
    export_cli(cli_runner, run, out)  # kohya and fp16 are the defaults
    with safe_open(str(out), "pt") as fh:
        keys = list(fh.keys())  # noqa: SIM118
        assert all(k.startswith("lora_unet_") for k in keys)
        assert {fh.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")} == {torch.float16}
        assert {fh.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {2.0}
    assert {k.rsplit(".", 1)[-1] if k.endswith(".alpha") else k.split(".", 1)[1] for k in keys} == {
        "alpha", "lora_down.weight", "lora_up.weight"}  # fmt: skip
    assert any("_input_blocks_" in k for k in keys) and any("_output_blocks_" in k for k in keys)
    assert any("_middle_block_1_" in k for k in keys)
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(out))
    assert lora_layers(pipe.unet) == training_modules(run)
    pipe.fuse_lora(components=["unet"])
    assert_close(unet_output(pipe.unet), reference["lora"], rel=5e-3)


def test_merged_pipeline_equals_fused_training_output(run, tiny_model_dir, tmp_path, cli_runner):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged"
    export_cli(cli_runner, run, out, "--format", "merged", "--scale", "0.5", "--dtype", "fp32")
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(run))
    pipe.fuse_lora(components=["unet"], lora_scale=0.5)
    expected = unet_output(pipe.unet)
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert not any("lora" in k for k in merged.state_dict())
    assert_close(unet_output(merged), expected, rel=1e-5)
    info = json.loads((out / "nlora_export.json").read_text())
    assert info["nlora.lora_scale"] == "0.5" and info["nlora.base_model"] == "nlora:tiny"
    assert pipeline(out).unet is not None  # the whole folder loads as a pipeline


def test_bf16_export(run, tmp_path, tiny_model_dir):
    profile = load_profile(str(run / "profile.toml"))
    result = export_lora(lora_file=run / WEIGHT_NAME, fmt="diffusers", out=tmp_path / "b.safetensors",
                         model_cfg=profile.model, dtype_name="bf16")  # fmt: skip
    with safe_open(str(result.path), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118


# --------------------------------------------------------------------------- metadata


def data_section_sha256(path: Path) -> str:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + header_len :]).hexdigest()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_every_export_carries_training_metadata(fmt, run, tmp_path, cli_runner):
    out = tmp_path / ("peft" if fmt == "peft" else "x.safetensors")
    export_cli(cli_runner, run, out, "--format", fmt)
    path = out / "adapter_model.safetensors" if fmt == "peft" else out
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    expected = {"nlora.base_model": "nlora:tiny", "nlora.rank": "4", "nlora.alpha": "2",
                "nlora.resolution": "64", "nlora.steps": "40", "nlora.profile": "smoke",
                "nlora.training_seconds": "12.5", "nlora.format": fmt, "nlora.dtype": "fp16",
                "nlora.architecture": "sdxl-architecture-custom/lora",
                "ss_network_dim": "4", "ss_network_alpha": "2"}  # fmt: skip
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["nlora.weights_sha256"] == meta["sshs_model_hash"] == data_section_sha256(path)


# --------------------------------------------------------------------------- sources


def test_ema_export_uses_ema_weights(run, tmp_path, cli_runner):
    out = tmp_path / "ema.safetensors"
    export_cli(cli_runner, run, out, "--ema", "--format", "diffusers", "--dtype", "fp32")
    ema_file, main_file = run / "ema_unet" / WEIGHT_NAME, run / WEIGHT_NAME
    with safe_open(str(out), "pt") as got, safe_open(str(ema_file), "pt") as ema:
        assert set(got.keys()) == set(ema.keys())  # noqa: SIM118
        assert all(torch.equal(got.get_tensor(k), ema.get_tensor(k)) for k in ema.keys())  # noqa: SIM118
        key = next(iter(ema.keys()))  # noqa: SIM118
        with safe_open(str(main_file), "pt") as main:
            assert not torch.equal(ema.get_tensor(key), main.get_tensor(key))


def test_kohya_file_converts_back_exactly(run, tmp_path, cli_runner, tiny_model_dir):
    """kohya -> diffusers round trip (reading kohya input, with its per-module alphas)."""
    kohya = tmp_path / "k.safetensors"
    export_cli(cli_runner, run, kohya, "--dtype", "fp32")
    back = tmp_path / "back.safetensors"
    result = invoke(cli_runner, ["export", "--lora", str(kohya), "--model", str(tiny_model_dir), "--vae", "",
                                 "--format", "diffusers", "--dtype", "fp32", "--out", str(back)])  # fmt: skip
    assert result.exit_code == 0, result.output
    with safe_open(str(back), "pt") as got, safe_open(str(run / WEIGHT_NAME), "pt") as original:
        assert set(got.keys()) == set(original.keys())  # noqa: SIM118
        assert all(torch.equal(got.get_tensor(k), original.get_tensor(k)) for k in original.keys())  # noqa: SIM118
        assert json.loads(got.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0


def test_checkpoint_folder_and_default_file_name(run, tmp_path, cli_runner):
    export_cli(cli_runner, run / "checkpoints" / "step-20", tmp_path / "exports")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["naruto-tiny-step-20.safetensors"]


# --------------------------------------------------------------------------- bad input


def test_folder_without_weights(tmp_path, cli_runner, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out" / "x.safetensors"
    result = invoke(cli_runner, ["export", "--lora", str(tmp_path / "empty"), "--out", str(out),
                                 "--model", str(tiny_model_dir)])  # fmt: skip
    assert result.exit_code == 2
    assert "No LoRA weights" in result.output
    assert not (tmp_path / "out").exists()


def test_lora_of_another_architecture(tmp_path, cli_runner, tiny_model_dir):
    """A LoRA trained on a UNet with another text width: the shapes do not fit the base."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.config.profile import LoraConfig
    from naruto_lora.lora import inject as lora

    config = dict(UNet2DConditionModel.load_config(tiny_model_dir, subfolder="unet"))
    config["cross_attention_dim"] = 64
    other = UNet2DConditionModel.from_config(config)
    lora.inject_lora(other, LoraConfig(rank=4, alpha=4))
    lora.save_lora(tmp_path / "other", lora.lora_state_dict(other), lora.adapter_metadata(other))
    out = tmp_path / "out" / "x.safetensors"
    result = invoke(cli_runner, ["export", "--lora", str(tmp_path / "other"), "--out", str(out),
                                 "--model", str(tiny_model_dir)])  # fmt: skip
    assert result.exit_code == 2
    assert "does not fit the base UNet" in result.output and "attn2.to_k" in result.output
    assert "(4, 64)" in result.output and "(4, 80)" in result.output
    assert not (tmp_path / "out").exists()


def test_kohya_file_for_another_model(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    path = tmp_path / "sd15.safetensors"
    name = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))  # fmt: skip
    profile = load_profile("smoke", overrides=[f"model.pretrained={str(tiny_model_dir)!r}"])
    with pytest.raises(UserError, match="name no layer of the base UNet"):
        export_lora(
            lora_file=path, fmt="kohya", out=tmp_path / "o.safetensors", model_cfg=profile.model
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_format(run, tmp_path, cli_runner):
    result = invoke(
        cli_runner, ["export", "--lora", str(run), "--format", "ckpt", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "ckpt" in result.output
    assert not (tmp_path / "o").exists()
    profile = load_profile(str(run / "profile.toml"))
    with pytest.raises(UserError, match="Unknown export format 'ckpt'"):
        export_lora(
            lora_file=run / WEIGHT_NAME, fmt="ckpt", out=tmp_path / "o", model_cfg=profile.model
        )


def test_ema_missing_is_a_clear_error(tmp_path, tiny_model_dir, cli_runner):
    make_output(tmp_path / "no-ema", tiny_model_dir)
    result = invoke(
        cli_runner,
        ["export", "--lora", str(tmp_path / "no-ema"), "--ema", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 2 and "no EMA weights" in result.output


def test_folder_with_other_files_is_not_replaced(run, tmp_path, cli_runner):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(
        cli_runner, ["export", "--lora", str(run), "--format", "peft", "--out", str(out)]
    )
    assert result.exit_code == 2 and "other files" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("breakage", ["drop a module", "wrong alpha"])
def test_a_wrong_conversion_is_caught_and_nothing_is_written(breakage, run, tmp_path, monkeypatch):
    """The check after writing is what guards users: break the converter on purpose."""
    import naruto_lora.export.writers as export

    original = export.kohya_tensors

    def broken(*args, **kwargs):
        tensors = original(*args, **kwargs)
        victim = sorted(k for k in tensors if k.endswith(".alpha"))[0].removesuffix(".alpha")
        if breakage == "drop a module":
            return {k: v for k, v in tensors.items() if not k.startswith(victim + ".")}
        return {**tensors, f"{victim}.alpha": torch.tensor(3.0)}

    monkeypatch.setattr(export, "kohya_tensors", broken)
    profile = load_profile(str(run / "profile.toml"))
    out = tmp_path / "new" / "x.safetensors"
    with pytest.raises(UserError, match="Export check failed"):
        export_lora(lora_file=run / WEIGHT_NAME, fmt="kohya", out=out, model_cfg=profile.model)
    assert not (tmp_path / "new").exists()


def test_mixed_ranks_and_alphas_survive_every_format(tmp_path, tiny_model_dir):
    """A kohya file written by hand (sgm names spelled out) with a different rank and alpha per
    module, one of them a 3x3 conv. The reference fuses ``alpha / rank * up @ down`` into the base
    weights by hand; each export must give the same UNet through diffusers' loader."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    modules = {  # kohya name: (diffusers module, rank, alpha)
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q":
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2, 1.0),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k":
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 8, 8.0),
        "lora_unet_output_blocks_1_1_transformer_blocks_1_attn2_to_v":
            ("up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_v", 8, 3.0),
        "lora_unet_input_blocks_1_0_in_layers_2": ("down_blocks.0.resnets.0.conv1", 4, 4.0),
    }  # fmt: skip
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    layers = dict(base.named_modules())
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for kohya, (module, rank, alpha) in modules.items():
        weight = layers[module].weight
        down_shape = (rank, *weight.shape[1:])  # a conv's down keeps the kernel
        up_shape = (weight.shape[0], rank) + (1, 1) * (weight.dim() == 4)
        down = torch.randn(down_shape, generator=generator) * 0.1
        up = torch.randn(up_shape, generator=generator) * 0.1
        tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                    f"{kohya}.alpha": torch.tensor(alpha)}  # fmt: skip
        with torch.no_grad():
            weight += (alpha / rank * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)
    expected = unet_output(base)
    source = tmp_path / "mixed.safetensors"
    save_file(tensors, str(source))

    profile = load_profile("smoke", overrides=[f"model.pretrained={str(tiny_model_dir)!r}"])
    for fmt in ("kohya", "diffusers", "peft", "merged"):
        out = tmp_path / (f"{fmt}.safetensors" if fmt in ("kohya", "diffusers") else fmt)
        export_lora(lora_file=source, fmt=fmt, out=out, model_cfg=profile.model, dtype_name="fp32")
        if fmt in ("kohya", "diffusers"):
            pipe = pipeline(tiny_model_dir)
            pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
            assert lora_layers(pipe.unet) == {m for m, _, _ in modules.values()}
            pipe.fuse_lora(components=["unet"])
            assert_close(unet_output(pipe.unet), expected, rel=1e-5)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet")
    assert_close(unet_output(merged), expected, rel=1e-5)
