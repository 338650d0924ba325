"""Profile files and plugin settings a user gets wrong give one clear message naming the file and
key (no traceback, exit code 2); listings never cut what a user must type."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from naruto_lora.plugins.hookspecs import hookimpl
from tests.conftest import invoke


def show(cli_runner, *args: str):
    return invoke(cli_runner, ["profiles", "show", *args])


def assert_clean_failure(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in expected:
        assert needle in text, (needle, text)


def test_a_profile_that_is_not_utf8_names_the_line(cli_runner, tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes('extends = "smoke"\n\ndescription = "caf\xe9"\n'.encode("latin-1"))
    assert_clean_failure(show(cli_runner, str(path)), "is not UTF-8", "0xe9 on line 3", "UTF-8")


def test_a_profile_saved_with_a_bom_loads(cli_runner, tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes('\ufeffextends = "smoke"\n[train]\nmax_steps = 7\n'.encode())
    result = show(cli_runner, str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["train"]["max_steps"] == 7


def test_a_bad_key_in_an_extended_file_names_that_file(cli_runner, tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('extends = "smoke"\n[train]\nmax_stpes = 10\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[train]\nmax_steps = 5\n')
    result = show(cli_runner, str(tmp_path / "child.toml"))
    assert_clean_failure(result, str(tmp_path / "base.toml"), "train.max_stpes", "extends")
    (tmp_path / "base.toml").write_text('extends = "smoke"\n[lora]\nrank = "four"\n')
    result = show(cli_runner, str(tmp_path / "child.toml"))
    assert_clean_failure(result, str(tmp_path / "base.toml"), "lora.rank", "wrong type")


def test_a_name_that_is_not_a_string_is_rejected(cli_runner, tmp_path: Path) -> None:
    path = tmp_path / "named.toml"
    path.write_text('extends = "smoke"\nname = 5\n')
    assert_clean_failure(show(cli_runner, str(path)), "name = 5", str(path), "must be a string")


def test_a_plugin_set_to_a_number_is_a_message(cli_runner, tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('extends = "smoke"\n[plugins]\nema = 3\n')
    assert_clean_failure(show(cli_runner, str(path)), "plugins.ema = 3", "[plugins.ema]")
    result = show(cli_runner, "smoke", "--set", "plugins.ema=3")
    assert_clean_failure(result, "plugins.ema = 3", "--enable ema")


# --------------------------------------------------------------------------- third-party plugins


@dataclasses.dataclass(frozen=True)
class SharpenConfig:
    amount: float  # no default: the user must give it


class Sharpen:
    name = "sharpen"
    Config = SharpenConfig

    def __init__(self, config: SharpenConfig) -> None:
        self.config = config

    @hookimpl
    def nlora_after_optimizer_step(self, state) -> None:
        pass


@pytest.fixture()
def sharpen_installed(monkeypatch):
    import naruto_lora.plugins.manager as plugins

    installed = plugins.entry_point_plugins()  # ours come through the same entry-point group
    monkeypatch.setattr(
        plugins,
        "entry_point_plugins",
        lambda: {**installed, "sharpen": (Sharpen, "entry point 'sharpen'")},
    )


def test_a_plugin_parameter_without_default_breaks_nothing_while_off(
    sharpen_installed, cli_runner
) -> None:
    result = show(cli_runner, "smoke", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["plugins"]["sharpen"] == {"enabled": False}
    listed = invoke(cli_runner, ["plugins", "list", "--profile", "smoke", "--json"])
    assert listed.exit_code == 0, listed.output
    row = next(r for r in json.loads(listed.output)["plugins"] if r["name"] == "sharpen")
    assert row["parameters"] == {"amount": "(required)"}
    assert_clean_failure(
        show(cli_runner, "smoke", "--enable", "sharpen"), "plugins.sharpen.amount", "no default"
    )
    result = show(cli_runner, "smoke", "--enable", "sharpen", "--set", "plugins.sharpen.amount=2")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- listings


def test_listings_piped_never_cut_names_and_give_json() -> None:
    """Through a pipe (no terminal: rich assumes 80 columns), as a user runs `... | grep`."""
    run = [sys.executable, "-m", "naruto_lora"]
    listed = subprocess.run(
        [*run, "plugins", "list", "--profile", "12gb"], capture_output=True, text=True, check=True
    )
    assert "gradient_checkpointing" in listed.stdout and "…" not in listed.stdout
    assert "min_snr" in listed.stdout and "offset_noise" in listed.stdout
    profiles = subprocess.run(
        [*run, "profiles", "list", "--json"], capture_output=True, text=True, check=True
    )
    names = [p["profile"] for p in json.loads(profiles.stdout)["profiles"]]
    assert {"14gb", "12gb", "8gb", "smoke"} <= set(names)
