"""Profile resolution: extends chains, precedence, every shipped profile, every invalid case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from naruto_lora.config.profile import builtin_profile_names, parse_set
from naruto_lora.plugins.manager import load_profile
from naruto_lora.util.errors import UserError
from tests.conftest import invoke


def test_every_shipped_profile_is_valid_and_roundtrips(tmp_path: Path) -> None:
    names = builtin_profile_names()
    assert {"14gb", "12gb", "8gb", "tiny"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.description, f"{name} needs a description"
        # The resolved TOML is itself a valid profile that resolves to the same values.
        path = tmp_path / f"{name}-resolved.toml"
        path.write_text(profile.to_toml())
        again = load_profile(str(path))
        assert again.to_dict() | {"name": name} == profile.to_dict()


def test_14gb_reference_recipe() -> None:
    p = load_profile("14gb")
    assert p.data.resolution == 1024
    assert (p.train.batch_size, p.train.gradient_accumulation_steps) == (1, 4)
    assert (p.lora.rank, p.lora.alpha) == (16, 16.0)
    assert p.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert p.train.learning_rate == 1e-4 and p.train.lr_scheduler == "cosine"
    assert (p.train.lr_warmup_steps, p.train.epochs, p.train.max_steps) == (100, 10, 2000)
    assert p.train.mixed_precision == "fp16"
    assert p.cache.latents is True and p.cache.text == "memory"
    assert p.enabled_plugins() == ["gradient_checkpointing"]  # plain MSE, no EMA
    assert p.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert p.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert p.data.source == "lambdalabs/naruto-blip-captions"


def test_12gb_extends_14gb_with_its_own_changes() -> None:
    p = load_profile("12gb")
    assert p.data.resolution == 768
    assert p.train.gradient_accumulation_steps == 8
    assert (p.lora.rank, p.lora.alpha) == (8, 8.0)
    assert (p.train.epochs, p.train.max_steps, p.train.lr_warmup_steps) == (15, 3000, 150)
    assert p.cache.text == "disk"
    assert set(p.enabled_plugins()) == {
        "sdpa",
        "ema",
        "min_snr",
        "offset_noise",
        "gradient_checkpointing",
    }
    assert p.plugins["ema"].config.decay == 0.9999
    assert p.plugins["min_snr"].config.gamma == 5.0
    assert p.plugins["offset_noise"].config.strength == 0.1
    # Inherited unchanged from 14gb.
    assert p.train.learning_rate == 1e-4 and p.train.mixed_precision == "fp16"
    assert p.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def test_8gb_is_12gb_at_512() -> None:
    p8, p12 = load_profile("8gb"), load_profile("12gb")
    assert (p8.data.resolution, p8.lora.rank, p8.train.gradient_accumulation_steps) == (512, 4, 16)
    assert p8.enabled_plugins() == p12.enabled_plugins()
    assert p8.cache.text == "disk"


def test_precedence_defaults_extends_profile_set_enable(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(
        'extends = "12gb"\n[train]\nlearning_rate = 3e-4\n[plugins.ema]\ndecay = 0.99\n'
    )
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\ndescription = "child"\n[train]\nmax_steps = 10\n')
    p = load_profile(
        str(child), overrides=["train.max_steps=20", "plugins.ema.enabled=true"], disable=["ema"]
    )
    assert p.train.learning_rate == 3e-4  # from the middle of the chain
    assert p.train.gradient_accumulation_steps == 8  # from 12gb
    assert p.train.max_steps == 20  # --set beats the profile
    assert p.plugins["ema"].config.decay == 0.99
    assert p.plugins["ema"].enabled is False  # --disable beats --set
    assert p.train.adam_beta2 == 0.999  # dataclass default
    assert p.description == "child"


def test_set_values_are_parsed_as_toml() -> None:
    assert parse_set("train.max_steps=5") == (["train", "max_steps"], 5)
    assert parse_set("lora.target_modules=['to_q']") == (["lora", "target_modules"], ["to_q"])
    assert parse_set("data.source=my/data") == (["data", "source"], "my/data")
    assert parse_set("data.center_crop=false") == (["data", "center_crop"], False)
    p = load_profile(
        "14gb", overrides=["lora.target_modules=['to_q', 'to_v']", "train.learning_rate=2e-4"]
    )
    assert p.lora.target_modules == ("to_q", "to_v")
    assert p.train.learning_rate == 2e-4


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["lora.rnak=4"], "lora.rnak"),
        (["train.max_steps='many'"], "train.max_steps"),
        (["train.max_steps=true"], "train.max_steps"),
        (["cache.text='gpu'"], "cache.text"),
        (["train.mixed_precision='fp8'"], "train.mixed_precision"),
        (["plugins.nope.enabled=true"], "nope"),
        (["plugins.ema.gamma=3"], "plugins.ema.gamma"),
        (["plugins.ema.decay=1.5"], "plugins.ema.decay"),
        (["plugins.min_snr.gamma=0"], "plugins.min_snr.gamma"),
        (["data.resolution=100"], "data.resolution"),
        (["lora.rank=0"], "lora.rank"),
        (["train.lr_scheduler='warp'"], "train.lr_scheduler"),
        (["bogus=1"], "bogus"),
        (["lora=3"], "[lora]"),
        (["train.max_steps"], "key.path=value"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as info:
        load_profile("12gb", overrides=overrides)
    assert needle in str(info.value)


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(UserError) as info:
        load_profile("14gb", overrides=["train.lerning_rate=1"])
    message = str(info.value)
    assert "train.lerning_rate" in message and "learning_rate" in message and "max_steps" in message


def test_unknown_plugin_lists_installed_ones() -> None:
    with pytest.raises(UserError) as info:
        load_profile("14gb", enable=["emma"])
    assert "emma" in str(info.value) and "ema" in str(info.value) and "min_snr" in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nmax_steps = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(str(broken))
    with pytest.raises(UserError, match="does not exist"):
        load_profile(str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="Unknown profile 'huge'"):
        load_profile("huge")
    loop_a, loop_b = tmp_path / "a.toml", tmp_path / "b.toml"
    loop_a.write_text('extends = "b.toml"\n')
    loop_b.write_text('extends = "a.toml"\n')
    with pytest.raises(UserError, match="loops"):
        load_profile(str(loop_a))


def test_profiles_are_frozen() -> None:
    import dataclasses

    p = load_profile("14gb")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.max_steps = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.plugins["ema"] = None  # type: ignore[index]


def test_cli_profiles_show_and_list(cli_runner) -> None:
    result = invoke(cli_runner, ["profiles", "show", "12gb"])
    assert result.exit_code == 0
    shown = tomllib.loads(result.output)
    assert shown["data"]["resolution"] == 768
    assert shown["lora"]["rank"] == 8 and shown["train"]["gradient_accumulation_steps"] == 8
    assert shown["cache"]["text"] == "disk"
    assert shown["plugins"]["min_snr"] == {"enabled": True, "gamma": 5.0}
    assert shown["plugins"]["offset_noise"]["strength"] == 0.1
    as_json = json.loads(invoke(cli_runner, ["profiles", "show", "12gb", "--json"]).output)
    assert as_json == shown
    listed = invoke(cli_runner, ["profiles", "list"])
    assert listed.exit_code == 0 and "14gb" in listed.output and "tiny" in listed.output


def test_cli_user_error_has_no_traceback(cli_runner) -> None:
    result = invoke(cli_runner, ["profiles", "show", "12gb", "--set", "lora.rnk=3"])
    assert result.exit_code == 2
    assert "lora.rnk" in result.output and "Traceback" not in result.output
