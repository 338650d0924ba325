"""Plugin discovery, configuration and listing, including a third-party plugin from an entry point."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from naruto_lora.plugins.manager import (
    build_plugin_manager,
    discover_plugins,
    hookspecs,
    load_profile,
    plugin_hooks,
)
from naruto_lora.util.errors import UserError
from tests.conftest import invoke

BUILTINS = {"ema", "offset_noise", "min_snr", "sdpa", "gradient_checkpointing"}


@pytest.fixture()
def third_party_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed distribution (dist-info with entry_points.txt) providing plugin 'sharpen'."""
    site = tmp_path / "site"
    (site / "nlora_sharpen").mkdir(parents=True)
    (site / "nlora_sharpen" / "__init__.py").write_text(
        textwrap.dedent("""
        from dataclasses import dataclass
        from naruto_lora.plugins.hookspecs import hookimpl

        @dataclass(frozen=True)
        class SharpenConfig:
            amount: float = 0.5

        class Sharpen:
            name = "sharpen"
            Config = SharpenConfig
            def __init__(self, config):
                self.config = config
            @hookimpl
            def nlora_loss_weights(self, state, timesteps):
                return None
    """)
    )
    dist = site / "nlora_sharpen-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlora-sharpen\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nlora]\nsharpen = nlora_sharpen:Sharpen\n")
    monkeypatch.syspath_prepend(str(site))
    yield "sharpen"
    sys.modules.pop("nlora_sharpen", None)


def test_builtins_are_discovered_with_config_dataclasses() -> None:
    plugins = discover_plugins()
    assert set(plugins) >= BUILTINS
    for name in BUILTINS:
        assert plugins[name].name == name
        assert plugins[name].__module__.startswith("nlora_plugins.")


def test_every_builtin_module_is_declared_in_the_entry_point_group() -> None:
    """One discovery path: a plugin file without its pyproject line would never be found."""
    import pkgutil
    from importlib import metadata

    import nlora_plugins

    modules = {i.name for i in pkgutil.iter_modules(nlora_plugins.__path__)}
    declared = {
        ep.value.split(":")[0].removeprefix("nlora_plugins.")
        for ep in metadata.entry_points(group="nlora")
        if ep.value.startswith("nlora_plugins.")
    }
    assert modules == declared
    assert set(discover_plugins()) >= {m for m in modules}  # each module's plugin has its name


def test_disabled_plugins_are_not_registered() -> None:
    pm = build_plugin_manager(load_profile("14gb"))
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert names == {"core", "gradient_checkpointing"}
    pm12 = build_plugin_manager(load_profile("12gb"))
    assert {pm12.get_name(p) for p in pm12.get_plugins()} == {"core"} | BUILTINS


def test_plugin_instances_carry_profile_config() -> None:
    pm = build_plugin_manager(load_profile("12gb", overrides=["plugins.min_snr.gamma=2.5"]))
    assert pm.get_plugin("min_snr").config.gamma == 2.5
    assert pm.get_plugin("ema").config.decay == 0.9999


def test_every_hookspec_is_documented_in_lifecycle() -> None:
    specs = {name for name in dir(hookspecs) if name.startswith("nlora_")}
    assert specs == set(hookspecs.LIFECYCLE)
    for name in specs:
        assert getattr(hookspecs, name).__doc__, f"{name} needs a docstring"


def test_firstresult_hooks_default_to_core_and_plugins_win() -> None:
    pm = build_plugin_manager(load_profile("14gb"))
    impls = [impl.plugin_name for impl in pm.hook.nlora_sample_noise.get_hookimpls()]
    assert impls == ["core"]
    pm12 = build_plugin_manager(load_profile("12gb"))
    # pluggy calls implementations last-registered-first, trylast at the end: offset_noise wins.
    impls = [impl.plugin_name for impl in pm12.hook.nlora_sample_noise.get_hookimpls()]
    assert (
        impls[0] == "core" and "offset_noise" in impls
    )  # core is trylast (first in list = called last)


def test_third_party_plugin_via_entry_point(third_party_plugin: str, cli_runner) -> None:
    plugins = discover_plugins()
    assert third_party_plugin in plugins
    assert plugin_hooks(plugins["sharpen"]) == ["nlora_loss_weights"]
    profile = load_profile("14gb", enable=["sharpen"], overrides=["plugins.sharpen.amount=0.9"])
    pm = build_plugin_manager(profile)
    assert pm.get_plugin("sharpen").config.amount == 0.9
    with pytest.raises(UserError, match="plugins.sharpen.radius"):
        load_profile("14gb", overrides=["plugins.sharpen.radius=2"])
    result = invoke(cli_runner, ["plugins", "list", "--json"])
    assert result.exit_code == 0
    listed = {row["name"]: row for row in json.loads(result.output)["plugins"]}
    assert listed["sharpen"]["parameters"] == {"amount": 0.5}
    assert listed["sharpen"]["module"] == "nlora_sharpen"


def test_plugins_list_cli_marks_profile(cli_runner) -> None:
    result = invoke(cli_runner, ["plugins", "list", "--profile", "12gb", "--json"])
    rows = {row["name"]: row for row in json.loads(result.output)["plugins"]}
    assert set(rows) >= BUILTINS
    assert all(rows[name]["enabled"] for name in BUILTINS)
    assert rows["min_snr"]["parameters"] == {"gamma": 5.0}
    assert "nlora_loss_weights" in rows["min_snr"]["hooks"]
    table = invoke(cli_runner, ["plugins", "list", "--profile", "14gb"])
    assert table.exit_code == 0 and "offset_noise" in table.output


def test_broken_entry_point_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nlora]\nbroken = no_such_module_xyz:Plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="broken"):
        discover_plugins()
