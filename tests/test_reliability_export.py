"""``nlora export`` and ``nlora sample`` keep what a user has and refuse broken LoRAs: no silent
replacement of ``--out``, NaN/inf weights refused by module, readable file modes, metadata without
local paths, the check one module at a time."""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from naruto_lora.lora.inject import WEIGHT_NAME
from tests.conftest import invoke
from tests.lora_factory import make_output


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "naruto-tiny"
    make_output(folder, tiny_model_dir, rank=4, alpha=2.0)
    return folder


def export(cli_runner, run: Path, out: Path, *args: str):
    return invoke(cli_runner, ["export", "--lora", str(run), "--out", str(out), *args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)


def test_an_existing_lora_file_is_not_replaced_without_overwrite(run, tmp_path, cli_runner):
    out = tmp_path / "naruto.safetensors"
    assert export(cli_runner, run, out).exit_code == 0
    before = sha(out)
    result = export(cli_runner, run, out, "--dtype", "fp32")
    assert_clean_failure(result, "already exists", "a LoRA file", "profile 'smoke'", "--overwrite")
    assert sha(out) == before
    result = export(cli_runner, run, out, "--dtype", "fp32", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sha(out) != before


@pytest.mark.parametrize(
    "content, described",
    [
        (None, "not a LoRA"),  # a safetensors file of other tensors (a checkpoint, a VAE)
        (b"not safetensors at all", "not a readable safetensors file"),
    ],
)
def test_an_existing_other_file_is_described_and_kept(
    content, described, run, tmp_path, cli_runner
):
    out = tmp_path / "model.safetensors"
    if content is None:
        save_file({"conv.weight": torch.ones(3, 3)}, str(out))
    else:
        out.write_bytes(content)
    before = sha(out)
    assert_clean_failure(export(cli_runner, run, out), described, "--overwrite")
    assert sha(out) == before


def test_an_earlier_folder_export_needs_overwrite(run, tmp_path, cli_runner):
    out = tmp_path / "peft"
    assert export(cli_runner, run, out, "--format", "peft").exit_code == 0
    before = sha(out / "adapter_model.safetensors")
    result = export(cli_runner, run, out, "--format", "peft", "--dtype", "fp32")
    assert_clean_failure(result, "already holds an export", "--overwrite")
    assert sha(out / "adapter_model.safetensors") == before
    result = export(cli_runner, run, out, "--format", "peft", "--dtype", "fp32", "--overwrite")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_exported_files_get_the_umask_mode(umask, mode, run, tmp_path, cli_runner):
    old = os.umask(umask)
    try:
        out = tmp_path / "shared.safetensors"
        assert export(cli_runner, run, out).exit_code == 0
        assert export(cli_runner, run, tmp_path / "peft", "--format", "peft").exit_code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_mode & 0o777 == mode
    assert (tmp_path / "peft").stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------- non-finite LoRAs


@pytest.fixture()
def nan_run(tmp_path, tiny_model_dir) -> Path:
    folder = tmp_path / "nan-run"
    make_output(folder, tiny_model_dir, rank=4, alpha=2.0)
    tensors = load_file(str(folder / WEIGHT_NAME))
    with safe_open(str(folder / WEIGHT_NAME), "pt") as fh:
        metadata = fh.metadata()
    bad = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[bad][0, 0] = float("nan")
    tensors[sorted(k for k in tensors if "lora_A" in k)[-1]][0, 0] = float("inf")
    save_file(tensors, str(folder / WEIGHT_NAME), metadata=metadata)
    return folder


def test_export_refuses_a_lora_with_nan_or_inf_by_module(nan_run, tmp_path, cli_runner):
    out = tmp_path / "x.safetensors"
    result = export(cli_runner, nan_run, out)
    assert_clean_failure(result, "non-finite weights", "2 of", "down_blocks")
    assert not out.exists() and "verified" not in result.output


def test_sample_refuses_a_lora_with_nan(nan_run, tmp_path, cli_runner):
    out = tmp_path / "black.png"
    result = invoke(
        cli_runner,
        ["sample", "--lora", str(nan_run), "--prompt", "x", "--steps", "2", "--out", str(out)],
    )
    assert_clean_failure(result, "non-finite weights")
    assert not out.exists()


# --------------------------------------------------------------------------- metadata


def test_kohya_metadata_has_the_required_modelspec_keys_and_no_local_paths(
    run, tmp_path, cli_runner, tiny_model_dir
):
    out = tmp_path / "k.safetensors"
    # The run's weights name the base model as trained: here a local folder path.
    tensors = load_file(str(run / WEIGHT_NAME))
    with safe_open(str(run / WEIGHT_NAME), "pt") as fh:
        metadata = {**fh.metadata(), "base_model": str(tiny_model_dir), "vae": "/srv/vaes/my-vae"}
    local = tmp_path / "local-run"
    local.mkdir()
    save_file(tensors, str(local / WEIGHT_NAME), metadata=metadata)
    (local / "profile.toml").write_text((run / "profile.toml").read_text())
    assert export(cli_runner, local, out).exit_code == 0
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert meta["ss_sd_model_name"] == tiny_model_dir.name and meta["nlora.vae"] == "my-vae"
    assert not any(str(tmp_path) in v or str(tiny_model_dir) in v for v in meta.values())


def test_shareable_model_name() -> None:
    from naruto_lora.export.writers import shareable_model_name

    assert shareable_model_name("stabilityai/stable-diffusion-xl-base-1.0") == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert shareable_model_name("nlora:tiny") == "nlora:tiny"
    assert shareable_model_name("/home/me/models/my-sdxl") == "my-sdxl"
    assert shareable_model_name("./models/my-sdxl/") == "my-sdxl"
    assert shareable_model_name("~/sdxl") == "sdxl"


def test_the_export_check_holds_one_module_delta_at_a_time(run, tmp_path, monkeypatch):
    """Each loaded delta is freed before the next is computed (all at once: 3.6 GiB on SDXL)."""
    from peft.tuners.lora import layer

    from naruto_lora.export.writers import export_lora
    from naruto_lora.plugins.manager import load_profile

    alive: list[weakref.ref] = []
    most = 0

    def tracking(real):
        def tracked(self, adapter):
            nonlocal most
            most = max(most, sum(1 for r in alive if r() is not None))
            delta = real(self, adapter)
            alive.append(weakref.ref(delta))
            return delta

        return tracked

    for kind in (layer.Linear, layer.Conv2d):
        monkeypatch.setattr(kind, "get_delta_weight", tracking(kind.get_delta_weight))
    profile = load_profile(str(run / "profile.toml"))
    result = export_lora(
        lora_file=run / WEIGHT_NAME, fmt="kohya", out=tmp_path / "o.safetensors",
        model_cfg=profile.model, dtype_name="fp32",
    )  # fmt: skip
    assert result.modules > 10 and len(alive) >= result.modules
    assert most <= 1


def test_kohya_files_with_conv_and_embedding_keys_load_in_the_lowest_diffusers_allowed(
    tmp_path, cli_runner, tiny_model_dir
):
    """diffusers 0.36-0.38 reject kohya files with conv_in/conv_out/time-embedding keys; the
    declared lower bound must be a version that loads them (the one tested here)."""
    from importlib.metadata import version

    from packaging.version import Version

    from naruto_lora.config.profile import tomllib  # tomli before Python 3.11

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    bound = next(d for d in declared["project"]["dependencies"] if d.startswith("diffusers"))
    lowest = Version(bound.split(">=")[1])
    assert lowest >= Version("0.39") and Version(version("diffusers")) >= lowest
    folder = tmp_path / "wide"
    make_output(folder, tiny_model_dir, targets=("conv_in", "conv_out", "linear_1", "to_q"))
    out = tmp_path / "wide.safetensors"
    result = export(cli_runner, folder, out)  # loaded back through diffusers before it is kept
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as fh:
        names = {k.split(".")[0] for k in fh.keys()}  # noqa: SIM118
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2"} <= names, sorted(names)[:5]


def test_a_full_disk_during_export_keeps_the_file_that_was_there(
    run, tmp_path, cli_runner, monkeypatch
):
    import errno

    import naruto_lora.util.io as io

    out = tmp_path / "kept.safetensors"
    assert export(cli_runner, run, out).exit_code == 0
    before = sha(out)

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "save_safetensors", full)
    result = export(cli_runner, run, out, "--overwrite")
    assert_clean_failure(result, "no space left on the disk", "not changed")
    assert sha(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept.safetensors"]  # no temp left


def test_sampling_into_a_read_only_folder_is_a_message(run, tmp_path, cli_runner, monkeypatch):
    import contextlib
    import errno

    import naruto_lora.util.io as io

    @contextlib.contextmanager
    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        yield

    monkeypatch.setattr(io, "atomic_path", denied)
    out = tmp_path / "ro" / "one.png"
    result = invoke(
        cli_runner,
        ["sample", "--lora", str(run), "--prompt", "x", "--steps", "2", "--out", str(out)],
    )
    assert_clean_failure(result, "permission is denied", "one.png")


def test_a_model_folder_with_a_code_running_pickle_is_refused(
    run, tmp_path, cli_runner, tiny_model_dir
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    torch.save({"payload": os.system}, model / "unet" / "diffusion_pytorch_model.bin")
    out = tmp_path / "x.png"
    result = invoke(
        cli_runner,
        ["sample", "--lora", str(run), "--model", str(model), "--vae", "", "--prompt", "x",
         "--steps", "2", "--out", str(out)],
    )  # fmt: skip
    assert_clean_failure(result, "UNet", "is not a safe format", "will not load")
    assert "weights_only=False" not in result.output and not out.exists()


def test_sample_keeps_images_that_are_there_unless_overwrite(run, tmp_path, cli_runner):
    out = tmp_path / "one.png"
    args = ["sample", "--lora", str(run), "--prompt", "x", "--steps", "2", "--out", str(out)]
    assert invoke(cli_runner, args).exit_code == 0
    before = sha(out)
    result = invoke(cli_runner, [*args, "--seed", "5"])
    assert_clean_failure(result, "already exist", "one.png", "--overwrite")
    assert sha(out) == before
    result = invoke(cli_runner, [*args, "--seed", "5", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sha(out) != before
