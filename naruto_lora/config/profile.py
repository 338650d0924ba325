"""TOML profiles: ``extends`` chains, strict validation, ``--set`` overrides -> frozen dataclasses.

Precedence, lowest first: dataclass defaults < the ``extends`` chain < the profile itself <
``--set key.path=value`` (the value parsed as TOML) < ``--enable NAME`` / ``--disable NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from naruto_lora.util.errors import UserError

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_DATA = "lambdalabs/naruto-blip-captions"

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


BASE_WEIGHTS = ("full", "int8", "fp8")  # model.base_weights (naruto_lora.models.quantize)


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = DEFAULT_MODEL
    # Empty means the model's own VAE. The fp16-fix VAE is the default because
    # SDXL's own VAE overflows to NaN in fp16.
    vae: str = DEFAULT_VAE
    revision: str = ""
    variant: str = ""
    # The frozen base's storage (BASE_WEIGHTS): "full" (the training dtype), or "int8" / "fp8":
    # one byte per weight with a scale per output channel (UNet, and text encoders kept
    # resident), computed in the training dtype; the LoRA stays full precision
    # (naruto_lora.models.quantize).
    base_weights: str = "full"


@dataclass(frozen=True)
class DataConfig:
    source: str = DEFAULT_DATA
    image_column: str = "image"
    caption_column: str = "text"
    split: str = "train"
    resolution: int = 1024
    center_crop: bool = True
    random_flip: bool = False
    buckets: bool = False
    max_items: int = 0
    # Every training caption through this template before it is encoded (and cached), e.g.
    # "{caption}, naruto style"; "" keeps the captions as they are.
    caption_template: str = ""


@dataclass(frozen=True)
class CacheConfig:
    dir: str = ".nlora-cache"
    latents: bool = True
    # "memory": text encoded on the fly by encoders on the device;
    # "disk": embeddings cached to disk, encoders never loaded by training.
    text: Literal["memory", "disk"] = "memory"
    shard_items: int = 256


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0
    # Conv-layer LoRA ("LoCon"): targeted Conv2d modules (the ResNets' conv1, conv2,
    # conv_shortcut; the samplers' downsamplers.0.conv, upsamplers.0.conv) get this rank and
    # alpha; 0 = the same as rank / an alpha in the same ratio to conv_rank as alpha to rank.
    conv_rank: int = 0
    conv_alpha: float = 0.0
    # DoRA (weight-decomposed LoRA, through peft): each targeted layer also learns a magnitude
    # per output channel; the LoRA's update then sets only the direction of each weight row.
    use_dora: bool = False


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    epochs: int = 10
    max_steps: int = 2000
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 500
    checkpoints_keep: int = 3
    max_nonfinite_in_row: int = 5
    dataloader_workers: int = 0
    output_dir: str = "output"


@dataclass(frozen=True)
class ValidationConfig:
    prompts: tuple[str, ...] = ("a ninja boy with spiky blond hair, naruto style",)
    every_steps: int = 0
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5


@dataclass(frozen=True)
class PluginSettings:
    """One ``[plugins.NAME]`` table: whether it runs, and the plugin's own config dataclass."""

    enabled: bool
    config: Any


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    plugins: Mapping[str, PluginSettings] = field(
        default_factory=lambda: types.MappingProxyType({})
    )

    def enabled_plugins(self) -> list[str]:
        return [name for name, settings in self.plugins.items() if settings.enabled]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved profile as plain TOML-able data (no ``extends``)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for section in SECTIONS:
            out[section] = _plain(dataclasses.asdict(getattr(self, section)))
        out["plugins"] = {
            name: {
                "enabled": s.enabled,
                **(_plain(dataclasses.asdict(s.config)) if s.config is not None else {}),
            }
            for name, s in sorted(self.plugins.items())
        }
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "cache": CacheConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
}
TOP_LEVEL_KEYS = ("extends", "name", "description", "plugins", *SECTIONS)

# CLI shorthands for the most used keys.
SHORTHANDS = {
    "model": "model.pretrained",
    "vae": "model.vae",
    "data": "data.source",
    "output": "train.output_dir",
    "cache_dir": "cache.dir",
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- locating


def builtin_profile_names() -> list[str]:
    root = resources.files("nlora_profiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _read_toml(path: Path | Any, label: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"Cannot read profile {label}: {exc.strerror or exc}.") from exc
    try:
        # utf-8-sig: editors on Windows save a byte-order mark, which TOML itself does not allow.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"Profile {label} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
            "cannot be decoded.",
            hint="Save the file as UTF-8 (TOML files must be UTF-8), e.g. with your editor's "
            "'save with encoding' or: iconv -f latin1 -t utf-8 OLD > NEW.",
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Profile {label} is not valid TOML: {exc}.", hint="Fix the file.") from exc


def locate_profile(
    name_or_path: str, relative_to: Path | None = None
) -> tuple[str, dict[str, Any], Path | None]:
    """Find a profile by shipped name or by file path; return (name, raw table, file path)."""
    candidate = Path(name_or_path).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    looks_like_path = name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path or candidate.is_file():
        if not candidate.is_file():
            raise UserError(
                f"Profile file '{candidate}' does not exist.",
                hint=f"Give a path to a .toml file or one of: {', '.join(builtin_profile_names())}.",
            )
        return candidate.stem, _read_toml(candidate, f"'{candidate}'"), candidate.resolve()
    if name_or_path in builtin_profile_names():
        res = resources.files("nlora_profiles") / f"{name_or_path}.toml"
        return name_or_path, _read_toml(res, f"'{name_or_path}' (built in)"), None
    raise UserError(
        f"Unknown profile '{name_or_path}'.",
        hint=f"Built-in profiles: {', '.join(builtin_profile_names())}; or give a path to a .toml file.",
    )


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def resolve_raw(
    name_or_path: str, plugin_classes: Mapping[str, type] | None = None
) -> tuple[str, dict[str, Any]]:
    """Merge a profile with its ``extends`` chain (base first); detect cycles. With
    ``plugin_classes`` each file's keys and types are checked on their own first, so an error
    names the file it is in, not only the profile that extends it."""
    chain: list[dict[str, Any]] = []
    labels: list[str] = []
    seen: list[str] = []
    current: str | None = name_or_path
    relative_to: Path | None = None
    name = ""
    while current is not None:
        found_name, raw, path = locate_profile(current, relative_to)
        key = str(path) if path else found_name
        if key in seen:
            raise UserError(f"Profile 'extends' chain loops: {' -> '.join([*seen, key])}.")
        seen.append(key)
        name = name or found_name
        chain.append(raw)
        labels.append(f"'{path}'" if path else f"'{found_name}' (built in)")
        if "name" in raw and not isinstance(raw["name"], str):
            raise UserError(
                f"name = {raw['name']!r} in profile {labels[-1]} must be a string.",
                hint='Quote it, e.g. name = "my-run".',
            )
        extends = raw.get("extends")
        if extends is not None and not isinstance(extends, str):
            raise UserError(
                f"Profile '{found_name}': 'extends' must be a profile name or path string."
            )
        current = extends
        relative_to = path.parent if path else None
    if plugin_classes is not None:
        chain = [
            upgrade_moved_keys(raw, plugin_classes, label)
            for raw, label in zip(chain, labels, strict=True)
        ]
        for i, (raw, label) in enumerate(zip(chain, labels, strict=True)):
            _check_file(raw, label, labels[i - 1] if i else None, plugin_classes)
    merged: dict[str, Any] = {}
    for raw in reversed(chain):
        merged = _deep_merge(merged, raw)
    merged.pop("extends", None)
    # A profile's own description wins; a parent's description does not describe the child.
    merged["description"] = chain[0].get("description", merged.get("description", ""))
    return name, merged


# Keys that are gone, with what replaced them (read, then ignored with this message).
REMOVED_KEYS = {
    "train.fused_optimizer": "the core's AdamW always uses the fused kernel on CUDA now",
}


def upgrade_moved_keys(
    raw: Mapping[str, Any], plugin_classes: Mapping[str, type], label: str
) -> dict[str, Any]:
    """Old keys that became plugins, rewritten to their ``[plugins.NAME]`` tables, each with a
    deprecation message. A plugin class declares what it replaces as ``replaces = {"train.key":
    fn}``, ``fn(old value)`` giving the plugin table to merge (or ``None``: nothing to do); this
    module names no plugin."""
    moves = {
        key: (name, upgrade)
        for name, cls in plugin_classes.items()
        for key, upgrade in getattr(cls, "replaces", {}).items()
    }
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for dotted in sorted({*moves, *REMOVED_KEYS}):
        section, key = dotted.split(".", 1)
        table = out.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table.pop(key)
        if dotted in REMOVED_KEYS:
            _deprecated(f"{dotted} ({label}) is ignored: {REMOVED_KEYS[dotted]}.")
            continue
        name, upgrade = moves[dotted]
        plugin_table = upgrade(value)
        if plugin_table is None:
            _deprecated(f"{dotted} = {_toml(value)} ({label}) is the default: remove it.")
            continue
        plugins = out.setdefault("plugins", {})
        if not isinstance(plugins, dict):
            continue  # _plugin_tables reports the broken [plugins] table
        plugins[name] = {**dict(plugins.get(name, {})), **plugin_table}
        new = ", ".join(f"{k} = {_toml(v)}" for k, v in plugin_table.items())
        _deprecated(f"{dotted} = {_toml(value)} ({label}) is now [plugins.{name}] {new}.")
    return out


def _toml(value: Any) -> str:
    return json.dumps(_plain(value))  # true, 1.5, "text": as a profile writes them


def _deprecated(message: str) -> None:
    from rich.markup import escape

    from naruto_lora.util.console import err_console

    err_console.print(f"[yellow]deprecated:[/] {escape(message)}", soft_wrap=True)


def _check_file(
    raw: Mapping[str, Any], label: str, extended_by: str | None, plugin_classes: Mapping[str, type]
) -> None:
    """One file of an ``extends`` chain on its own: known keys of the right types."""
    try:
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise UserError(
                f"Unknown top-level key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}.",
                hint=f"Valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}.",
            )
        for key, cls in SECTIONS.items():
            if key in raw:
                build_dataclass(cls, raw[key], key, construct=False)
        for plugin_name, table in _plugin_tables(raw.get("plugins", {}), plugin_classes).items():
            table = dict(table)
            table.pop("enabled", None)
            config_cls = plugin_classes[plugin_name].Config
            build_dataclass(config_cls, table, f"plugins.{plugin_name}", construct=False)
    except UserError as exc:
        via = f", which {extended_by} extends" if extended_by else ""
        raise UserError(f"In profile {label}{via}: {exc.args[0]}", hint=exc.hint) from None


def _plugin_tables(tables: Any, plugin_classes: Mapping[str, type]) -> Mapping[str, Any]:
    """The ``[plugins]`` table checked: known plugin names, each a table."""
    if not isinstance(tables, Mapping):
        raise UserError("[plugins] must be a table of [plugins.NAME] tables.")
    for plugin_name, table in tables.items():
        if plugin_name not in plugin_classes:
            raise UserError(
                f"Unknown plugin '{plugin_name}' in [plugins.{plugin_name}].",
                hint=f"Installed plugins: {', '.join(sorted(plugin_classes))}.",
            )
        if not isinstance(table, Mapping):
            raise UserError(
                f"plugins.{plugin_name} = {table!r} must be a table of the plugin's settings.",
                hint=f"Write [plugins.{plugin_name}] then enabled = true (and its parameters), "
                f"or use --enable {plugin_name} / --set plugins.{plugin_name}.enabled=true.",
            )
    return tables


# --------------------------------------------------------------------------- overrides


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """``key.path=value`` with the value parsed as TOML (bare words are taken as strings)."""
    if "=" not in assignment:
        raise UserError(
            f"--set '{assignment}' needs the form key.path=value, e.g. train.max_steps=500."
        )
    key, _, text = assignment.partition("=")
    path = [part.strip() for part in key.strip().split(".")]
    if not all(path):
        raise UserError(f"--set '{assignment}': '{key}' is not a dotted key path.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: treat as a string, as people type it
    return path, value


def apply_override(raw: dict[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    top: dict[str, Any] = {}
    node = top
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return _deep_merge(raw, top)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = UserError(
        f"{where} = {value!r} has the wrong type: expected {_type_name(tp)}.",
    )
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where} = {value!r} is not allowed; choose one of: {_type_name(tp)}.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {where}")  # a bug in a dataclass


def build_dataclass(cls: type, table: Any, where: str, construct: bool = True) -> Any:
    """Fill a frozen dataclass from a TOML table; unknown keys and wrong types are user errors.
    ``construct=False`` only checks the table (a part of a profile may lack required keys)."""
    if not isinstance(table, Mapping):
        raise UserError(f"[{where}] must be a table, got {table!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise UserError(
            f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}' for k in unknown)}.",
            hint=f"Valid keys in [{where}]: {', '.join(sorted(fields))}.",
        )
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    if not construct:
        return None
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise UserError(
            f"[{where}] needs {', '.join(f'{where}.{k}' for k in required)}: "
            f"{'they have' if len(required) > 1 else 'it has'} no default.",
            hint=f"Set {'them' if len(required) > 1 else 'it'} in the [{where}] table of the "
            f"profile, or with --set {where}.{required[0]}=VALUE.",
        )
    return cls(**values)


def _required_fields(cls: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


# Value rules that types cannot express: (dotted key, test, what the value must be).
_VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.resolution", lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8"),
    ("data.max_items", lambda v: v >= 0, "0 (all) or more"),
    ("data.source", bool, "a hub id or a local folder"),
    (
        "data.caption_template",
        lambda v: v == "" or "{caption}" in v,
        '"" (captions as they are) or a text with {caption} in it, e.g. "{caption}, naruto style"',
    ),
    ("model.pretrained", bool, "a hub id or a local folder"),
    (
        "model.base_weights",
        lambda v: v in BASE_WEIGHTS,
        '"full" (the training dtype), "int8" or "fp8"',
    ),
    ("cache.shard_items", lambda v: v >= 1, "at least 1"),
    ("lora.rank", lambda v: v >= 1, "at least 1"),
    ("lora.alpha", lambda v: v > 0, "positive"),
    ("lora.target_modules", lambda v: len(v) > 0, "a non-empty list"),
    ("lora.dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("lora.conv_rank", lambda v: v >= 0, "0 (same as lora.rank) or more"),
    ("lora.conv_alpha", lambda v: v >= 0, "0 (alpha / rank x conv_rank) or positive"),
    ("train.batch_size", lambda v: v >= 1, "at least 1"),
    ("train.gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("train.epochs", lambda v: v >= 1, "at least 1"),
    ("train.max_steps", lambda v: v >= 1, "at least 1"),
    ("train.learning_rate", lambda v: v > 0, "positive"),
    ("train.lr_scheduler", lambda v: v in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}"),
    ("train.lr_warmup_steps", lambda v: v >= 0, "0 or more"),
    ("train.max_grad_norm", lambda v: v >= 0, "0 (off) or more"),
    ("train.checkpoint_every", lambda v: v >= 0, "0 (off) or more"),
    ("train.checkpoints_keep", lambda v: v >= 1, "at least 1"),
    ("train.max_nonfinite_in_row", lambda v: v >= 1, "at least 1"),
    ("validation.every_steps", lambda v: v >= 0, "0 (off) or more"),
)


def _validate_values(profile: Profile) -> None:
    for key, ok, expected in _VALUE_RULES:
        section, name = key.split(".")
        value = getattr(getattr(profile, section), name)
        if not ok(value):
            raise UserError(f"{key} = {_plain(value)!r} is invalid: it must be {expected}.")


def validate(name: str, raw: Mapping[str, Any], plugin_classes: Mapping[str, type]) -> Profile:
    """Turn a merged raw table into a ``Profile``; every problem is a ``UserError``.

    ``plugin_classes`` (name -> plugin class) are handed in: this package never imports plugin
    code, so one broken plugin cannot break profile handling.
    """
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UserError(
            f"Unknown top-level key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in profile '{name}'.",
            hint=f"Valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}.",
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"description = {description!r} must be a string.")
    sections = {key: build_dataclass(cls, raw.get(key, {}), key) for key, cls in SECTIONS.items()}

    plugin_tables = _plugin_tables(raw.get("plugins", {}), plugin_classes)
    plugins: dict[str, PluginSettings] = {}
    for plugin_name, cls in sorted(plugin_classes.items()):
        table = dict(plugin_tables.get(plugin_name, {}))
        enabled = table.pop("enabled", False)
        if not isinstance(enabled, bool):
            raise UserError(f"plugins.{plugin_name}.enabled = {enabled!r} must be true or false.")
        if not enabled and not table and _required_fields(cls.Config):
            # A plugin whose parameters have no default, off and not configured: nothing to
            # build, and no reason to fail a profile that does not use it.
            plugins[plugin_name] = PluginSettings(enabled=False, config=None)
            continue
        config = build_dataclass(cls.Config, table, f"plugins.{plugin_name}")
        validate_config = getattr(config, "validate", None)
        if callable(validate_config):
            validate_config()
        plugins[plugin_name] = PluginSettings(enabled=enabled, config=config)

    profile = Profile(
        name=str(raw.get("name", name)),
        description=description,
        plugins=types.MappingProxyType(plugins),
        **sections,
    )
    _validate_values(profile)
    return profile


def resolve_profile(
    name_or_path: str,
    plugin_classes: Mapping[str, type],
    overrides: Iterable[str] = (),
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
) -> Profile:
    """Resolve a profile with the CLI's overrides applied, in the documented precedence
    (defaults < extends chain < profile < ``--set`` < ``--enable``/``--disable``). Most callers
    want ``naruto_lora.plugins.manager.load_profile``, which finds the installed plugins."""
    name, raw = resolve_raw(name_or_path, plugin_classes)
    raw.pop("name", None)
    for assignment in overrides:
        path, value = parse_set(assignment)
        raw = upgrade_moved_keys(apply_override(raw, path, value), plugin_classes, "--set")
    for flag, names, value in (("--enable", enable, True), ("--disable", disable, False)):
        for plugin_name in names:
            if plugin_name not in plugin_classes:
                raise UserError(
                    f"{flag} {plugin_name}: no such plugin.",
                    hint=f"Installed plugins: {', '.join(sorted(plugin_classes))}.",
                )
            raw = apply_override(raw, ["plugins", plugin_name, "enabled"], value)
    return validate(name, raw, plugin_classes)


def write_resolved(profile: Profile, path: Path) -> None:
    """Write the resolved profile next to a run's outputs (atomically), so it can be reproduced."""
    from naruto_lora.util.io import atomic_write_text

    atomic_write_text(path, profile.to_toml())
