"""The plugin manager: plugins from the ``nlora`` entry-point group (ours and third parties'), then ``check_pending``.

A plugin is a class with a ``name``, a frozen-dataclass ``Config`` filled from the profile's
``[plugins.NAME]`` table, and ``@hookimpl`` methods. The core never names a plugin: a disabled
plugin is simply not registered. A fresh manager is built for every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar

import pluggy

from naruto_lora.plugins import hookspecs
from naruto_lora.plugins.hookspecs import PROJECT
from naruto_lora.util.errors import UserError

if TYPE_CHECKING:
    from naruto_lora.config.profile import Profile

ENTRY_POINT_GROUP = "nlora"
BUILTIN_PACKAGE = "nlora_plugins"  # our own plugins, declared in the same group


@dataclass(frozen=True)
class NoConfig:
    """For plugins without parameters."""


class Plugin:
    """Base class for plugins (optional: any class with ``name`` and ``Config`` works)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    description: ClassVar[str] = ""
    # False: switching the plugin on or off computes the same training (a speed switch), so
    # --resume accepts the change.
    changes_training: ClassVar[bool] = True
    # Old profile keys this plugin replaces: {"section.key": fn(old value) -> plugin table or
    # None}; the profile loader rewrites them with a deprecation message.
    replaces: ClassVar[dict[str, Any]] = {}
    # A memory option `nlora plan --fit` may switch ("activation_checkpointing",
    # "optimizer_8bit", "tiled_decode"), and the out-of-memory advice for it.
    memory_role: ClassVar[str] = ""
    memory_advice: ClassVar[str] = ""
    # An optimizer plugin's state in bytes per trainable parameter, for `nlora plan --fit`'s
    # formulas (0: not an optimizer; the core AdamW keeps two fp32 moments, 8 bytes).
    optimizer_state_bytes: ClassVar[float] = 0.0

    def __init__(self, config: Any):
        self.config = config


def _check_plugin_class(obj: Any, origin: str) -> type:
    name = getattr(obj, "name", None)
    config = getattr(obj, "Config", None)
    if not isinstance(obj, type) or not isinstance(name, str) or not name:
        raise UserError(f"Plugin {origin} is not a class with a non-empty 'name' attribute.")
    if config is None or not dataclasses.is_dataclass(config):
        raise UserError(f"Plugin '{name}' ({origin}) must declare 'Config' as a dataclass.")
    return obj


def entry_point_plugins() -> dict[str, tuple[type, str]]:
    found: dict[str, tuple[type, str]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point '{ep.name} = {ep.value}'"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party install must not look like our bug
            raise UserError(
                f"Could not load plugin {origin}: {exc}.",
                hint="Reinstall or uninstall the package that provides it.",
            ) from exc
        cls = _check_plugin_class(obj, origin)
        if cls.name in found and found[cls.name][0] is not cls:
            raise UserError(
                f"Plugin name '{cls.name}' from {origin} clashes with the plugin of "
                f"{found[cls.name][1]}.",
                hint="Rename or uninstall one of them.",
            )
        found[cls.name] = (cls, origin)
    return found


def discover_plugins() -> dict[str, type]:
    """All installed plugins by name, ours and third parties' alike: one discovery path, the
    ``nlora`` entry-point group (ours are declared in naruto-lora's ``pyproject.toml``)."""
    return {name: cls for name, (cls, _origin) in sorted(entry_point_plugins().items())}


def load_profile(
    name_or_path: str = "14gb",
    overrides: Iterable[str] = (),
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
    plugin_classes: Mapping[str, type] | None = None,
) -> Profile:
    """Resolve a profile against the installed plugins (``discover_plugins``), with the CLI's
    overrides applied (``naruto_lora.config.profile.resolve_profile``)."""
    from naruto_lora.config.profile import resolve_profile

    if plugin_classes is None:
        plugin_classes = discover_plugins()
    return resolve_profile(name_or_path, plugin_classes, overrides, enable, disable)


def validate_profile(name: str, raw: Mapping[str, Any]) -> Profile:
    """``naruto_lora.config.profile.validate`` against the installed plugins."""
    from naruto_lora.config.profile import validate

    return validate(name, raw, discover_plugins())


def new_manager() -> pluggy.PluginManager:
    from naruto_lora.plugins import defaults

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults.CoreDefaults(), name="core")
    return pm


def build_plugin_manager(
    profile: Profile, plugin_classes: Mapping[str, type] | None = None
) -> pluggy.PluginManager:
    """A fresh manager with the core defaults and every plugin the profile enables."""
    if plugin_classes is None:
        plugin_classes = discover_plugins()
    pm = new_manager()
    for name in profile.enabled_plugins():
        cls = plugin_classes[name]
        pm.register(cls(profile.plugins[name].config), name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UserError(f"A plugin implements a hook that does not exist: {exc}.") from exc
    return pm


def plugin_hooks(cls: type) -> list[str]:
    """The hook names a plugin class implements (for ``nlora plugins list``)."""
    names = []
    for attr in dir(cls):
        if attr.startswith("nlora_") and hasattr(getattr(cls, attr), f"{PROJECT}_impl"):
            names.append(attr)
    order = {name: i for i, name in enumerate(hookspecs.LIFECYCLE)}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def optimizer_name(profile: Profile) -> str:
    """The enabled plugin that builds the optimizer (``nlora_build_optimizer``), or "adamw", the
    core's default."""
    classes = discover_plugins()
    for name in profile.enabled_plugins():
        if name in classes and "nlora_build_optimizer" in plugin_hooks(classes[name]):
            return name
    return "adamw"


REQUIRED = "(required)"  # shown for a parameter without a default


def plugin_parameters(cls: type) -> list[tuple[str, Any]]:
    def default(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return REQUIRED

    return [(f.name, default(f)) for f in dataclasses.fields(cls.Config)]
