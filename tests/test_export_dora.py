"""DoRA (``lora.use_dora``): our reading of a DoRA module against peft's own DoRA layers, and
every export format reloaded through the loaders its users run, fused and compared with the
training output fused by diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from naruto_lora.lora.inject import WEIGHT_NAME
from naruto_lora.lora.weights import LoraModule, read_lora, weightless_unet
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.lora_factory import make_output
from tests.test_export import (
    assert_close,
    export_cli,
    lora_layers,
    pipeline,
    training_modules,
    unet_output,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A DoRA training output (Linear and Conv2d targets, magnitudes off their start)."""
    folder = tmp_path_factory.mktemp("dora-runs") / "naruto-dora"
    make_output(folder, tiny_model_dir, rank=4, alpha=2.0, dora=True, ema=True)
    return folder


@pytest.fixture(scope="module")
def reference(run, tiny_model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The training output fused by diffusers, and the same LoRA without the magnitudes."""
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(run))
    pipe.fuse_lora(components=["unet"])
    with safe_open(str(run / WEIGHT_NAME), "pt") as fh:
        metadata = fh.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.use_dora"] = False
    metadata["lora_adapter_metadata"] = json.dumps(config)
    plain_keys = {
        k: v for k, v in load_file(str(run / WEIGHT_NAME)).items() if "magnitude" not in k
    }
    plain_file = tmp_path_factory.mktemp("plain") / WEIGHT_NAME
    save_file(plain_keys, str(plain_file), metadata=metadata)
    plain = pipeline(tiny_model_dir)
    plain.load_lora_weights(str(plain_file.parent))
    plain.fuse_lora(components=["unet"])
    return {"dora": unet_output(pipe.unet), "plain": unet_output(plain.unet)}


def test_magnitudes_matter(reference) -> None:
    """Guards the other tests: a loader that dropped the magnitudes would be caught."""
    difference = (reference["dora"] - reference["plain"]).abs().max()
    assert difference > 0.05 * reference["dora"].abs().max()


# --------------------------------------------------------------------------- against peft's layer


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fused_weight_equals_peft_dora_merge(kind: str, scale: float) -> None:
    """``LoraModule.fused`` against peft's own DoRA layer merged at the same scale."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7) if kind == "linear" else torch.nn.Conv2d(5, 6, 3, padding=1)
    model = torch.nn.Sequential(layer)
    base = layer.weight.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True)
    )
    wrapped = peft_model.base_model.model[0]
    with torch.no_grad():
        wrapped.lora_B["default"].weight.normal_(std=0.3)
        magnitude = wrapped.lora_magnitude_vector["default"].weight
        magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))
    ours = LoraModule(
        down=wrapped.lora_A["default"].weight.detach().clone(),
        up=wrapped.lora_B["default"].weight.detach().clone(),
        alpha=6.0,
        magnitude=magnitude.detach().reshape(-1).clone(),
    )
    assert ours.peft_magnitude().shape == magnitude.shape
    wrapped.scale_layer(scale)
    merged = peft_model.merge_and_unload()[0].weight.detach()
    torch.testing.assert_close(ours.fused(base, scale), merged, rtol=1e-5, atol=1e-6)
    # and the paper's formula, written out: m * (W + s dW) / ||W + s dW||, row by row
    combined = base + scale * ours.delta()
    norms = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
    expected = magnitude.detach().reshape(norms.shape) * combined / norms
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the formats


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_dora_exports_load_and_fuse_like_the_training_output(
    fmt, run, tiny_model_dir, tmp_path, cli_runner, reference
) -> None:
    from peft import PeftModel

    if fmt == "diffusers":
        out = tmp_path / "dora.safetensors"
        result = export_cli(cli_runner, run, out, "--format", fmt, "--dtype", "fp32")
        pipe = pipeline(tiny_model_dir)
        pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
        unet = pipe.unet
        metadata = json.loads(safe_open(str(out), "pt").metadata()["lora_adapter_metadata"])
        assert metadata["unet.use_dora"] is True
    else:
        out = tmp_path / "peft"
        result = export_cli(cli_runner, run, out, "--format", fmt, "--dtype", "fp32")
        assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
        unet = PeftModel.from_pretrained(pipeline(tiny_model_dir).unet, str(out))
    assert "DoRA" in result.output
    assert lora_layers(unet) == training_modules(run)
    assert all(
        "default" in m.lora_magnitude_vector or "default_0" in m.lora_magnitude_vector
        for m in unet.modules()
        if hasattr(m, "lora_magnitude_vector") and m.lora_A
    )
    if fmt == "diffusers":
        unet.fuse_lora()
    else:
        unet = unet.merge_and_unload()
    assert_close(unet_output(unet), reference["dora"], rel=1e-5)


def test_kohya_dora_scale_has_the_output_axis_shape(run, tiny_model_dir, tmp_path, cli_runner):
    """``dora_scale`` is (out, 1) for Linear and (out, 1, 1, 1) for Conv2d, equal to the trained
    magnitudes; divided by the per-row norm ComfyUI and Forge compute (keepdim, (out, 1, ...)) it
    keeps the weight's shape: a 1-D vector would broadcast to (out, out) (ComfyUI #12938)."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.lora.kohya import SgmLayout, kohya_name

    out = tmp_path / "dora-kohya.safetensors"
    result = export_cli(cli_runner, run, out, "--format", "kohya", "--dtype", "fp32")
    assert "dora_scale" in result.output and "--format diffusers" in result.output
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    trained = read_lora(run / WEIGHT_NAME, weightless_unet(unet.config))
    exported = read_lora(out, weightless_unet(unet.config))
    layers = dict(unet.named_modules())
    tensors = load_file(str(out))
    layout = SgmLayout.from_config(unet.config)
    assert sum(k.endswith(".dora_scale") for k in tensors) == len(trained.modules)
    shapes = set()
    for name, module in trained.modules.items():
        weight = layers[name].weight
        assert torch.equal(exported.modules[name].magnitude, module.magnitude)
        dora_scale = tensors[f"{kohya_name(name, layout)}.dora_scale"]
        assert torch.equal(dora_scale.flatten(), module.magnitude)
        assert dora_scale.shape == (weight.shape[0],) + (1,) * (weight.dim() - 1)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        assert (dora_scale / norm).shape == dora_scale.shape
        shapes.add(weight.dim())
    assert shapes == {2, 4}  # both layer kinds were checked
    metadata = safe_open(str(out), "pt").metadata()
    assert json.loads(metadata["ss_network_args"])["wd_on_out"] == "True"


def test_diffusers_reads_a_kohya_dora_file_as_plain_lora(run, tiny_model_dir, tmp_path, cli_runner):
    """What the export's note says: diffusers drops dora_scale from kohya files. If a diffusers
    release starts reading it, this fails and the note must change."""
    out = tmp_path / "dora-kohya.safetensors"
    export_cli(cli_runner, run, out, "--format", "kohya", "--dtype", "fp32")
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    assert lora_layers(pipe.unet) == training_modules(run)
    assert not any(len(getattr(m, "lora_magnitude_vector", {})) for m in pipe.unet.modules())


def test_merged_dora_equals_diffusers_fuse_at_a_scale(run, tiny_model_dir, tmp_path, cli_runner):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged"
    export_cli(cli_runner, run, out, "--format", "merged", "--scale", "0.5", "--dtype", "fp32")
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(run))
    pipe.fuse_lora(components=["unet"], lora_scale=0.5)
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert_close(unet_output(merged), unet_output(pipe.unet), rel=1e-5)


def test_kohya_dora_file_converts_back_exactly(run, tmp_path, cli_runner, tiny_model_dir):
    """kohya -> diffusers: the magnitudes survive the round trip through our kohya reader."""
    kohya = tmp_path / "k.safetensors"
    export_cli(cli_runner, run, kohya, "--format", "kohya", "--dtype", "fp32")
    back = tmp_path / "back.safetensors"
    export_cli(cli_runner, kohya, back, "--format", "diffusers", "--dtype", "fp32",
               "--model", str(tiny_model_dir))  # fmt: skip
    original, again = load_file(str(run / WEIGHT_NAME)), load_file(str(back))
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert torch.equal(again[key], value), key


def test_sampling_attaches_the_magnitudes(run, tiny_model_dir, reference) -> None:
    """``nlora sample``'s loader (load_into_unet) gives the UNet diffusers gives."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.lora.weights import load_into_unet

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    load_into_unet(unet, read_lora(run / WEIGHT_NAME, unet), "nlora")
    unet.fuse_lora()
    assert_close(unet_output(unet), reference["dora"], rel=1e-5)


# --------------------------------------------------------------------------- refusals


def _kohya_with(tmp_path: Path, run: Path, cli_runner, change) -> Path:
    out = tmp_path / "k.safetensors"
    export_cli(cli_runner, run, out, "--format", "kohya", "--dtype", "fp32")
    tensors = load_file(str(out))
    change(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    return bad


def test_input_axis_dora_is_refused_by_name(run, tmp_path, cli_runner, tiny_model_dir) -> None:
    def to_input_axis(tensors):
        key = next(k for k in tensors if k.endswith(".dora_scale") and "attn1_to_q" in k)
        down = tensors[key.replace("dora_scale", "lora_down.weight")]
        tensors[key] = torch.ones(1, down.shape[1])

    bad = _kohya_with(tmp_path, run, cli_runner, to_input_axis)
    with pytest.raises(UserError, match=r"(?s)DoRA magnitude of shape \(1, .*wd_on_out"):
        read_lora(bad, weightless_unet(pipeline(tiny_model_dir).unet.config))
    result = invoke(cli_runner, ["export", "--lora", str(bad), "--out", str(tmp_path / "x"),
                                 "--model", str(tiny_model_dir)])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "input-axis" in result.output.lower() or "Input-axis" in result.output


def test_a_file_mixing_dora_and_plain_modules_is_refused(run, tmp_path, cli_runner, tiny_model_dir):
    def drop_one(tensors):
        del tensors[next(k for k in sorted(tensors) if k.endswith(".dora_scale"))]

    bad = _kohya_with(tmp_path, run, cli_runner, drop_one)
    with pytest.raises(UserError, match="mixes DoRA and plain LoRA"):
        read_lora(bad, weightless_unet(pipeline(tiny_model_dir).unet.config))
