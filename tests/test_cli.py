"""The CLI frame: every subcommand is there, helps on its own, and runs as a module too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import invoke

PHASES = ["doctor", "cache", "train", "sample", "export", "profiles", "plugins", "plan", "demo"]


def test_help_lists_every_subcommand(cli_runner) -> None:
    result = invoke(cli_runner, ["--help"])
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    for name in PHASES:
        assert f"  {name} " in listed or f"  {name}\n" in listed, f"{name} missing from --help"


@pytest.mark.parametrize(
    "args",
    [
        ["doctor"],
        ["cache", "latents"],
        ["cache", "text"],
        ["cache", "info"],
        ["train"],
        ["sample"],
        ["export"],
        ["profiles", "show"],
        ["plugins", "list"],
        ["plan"],
        ["demo"],
    ],
)
def test_each_command_has_useful_help(cli_runner, args: list[str]) -> None:
    result = invoke(cli_runner, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    body = result.output.split("Options:")[0]
    assert len(body.split("\n", 2)[-1].strip()) > 20, f"{args}: --help needs a description"


def test_phase_commands_take_profile_and_set(cli_runner) -> None:
    for args in (["cache", "latents"], ["cache", "text"], ["train"], ["sample"], ["export"]):
        output = invoke(cli_runner, [*args, "--help"]).output
        assert "--profile" in output and "--set" in output, args


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "naruto_lora", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nlora" in out.stdout


def test_user_error_exit_code_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "naruto_lora", "profiles", "show", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Unknown profile 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "naruto_lora", "--debug", "profiles", "show", "nope"],
        capture_output=True,
        text=True,
    )
    assert "Traceback" in debug.stderr
