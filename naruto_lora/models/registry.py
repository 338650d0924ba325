"""The ``nlora:`` ids: built-in models and data sets, made or unpacked on first use.

The loaders know no id themselves. Packages register theirs through the ``nlora.ids`` entry-point
group (the built-in demo world does, ``naruto_lora.demo.registry``): each entry point names a
function that is called once with this module and calls ``register``. So production code never
imports the demo, and another package can ship its own ``nlora:`` models the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from naruto_lora.util.errors import UserError

ENTRY_POINT_GROUP = "nlora.ids"
PREFIX = "nlora:"


@dataclass(frozen=True)
class BuiltinId:
    id: str
    kind: str  # "model" or "data"
    resolve: Callable[[], str]  # the local folder, built on first use
    status: Callable[[], tuple[bool, str]]  # (available, where or why not), building nothing
    description: str = ""


_IDS: dict[str, BuiltinId] = {}
_loaded = False


def register(entry: BuiltinId) -> None:
    if not entry.id.startswith(PREFIX):
        raise ValueError(f"built-in ids start with '{PREFIX}': {entry.id!r}")
    _IDS[entry.id] = entry


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import sys

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()(sys.modules[__name__])
        except Exception as exc:  # a broken third-party install must not look like our bug
            raise UserError(
                f"Could not load the nlora ids of entry point '{ep.name} = {ep.value}': {exc}.",
                hint="Reinstall or uninstall the package that provides it.",
            ) from exc


def builtin_ids(kind: str | None = None) -> dict[str, BuiltinId]:
    _load_entry_points()
    return {k: v for k, v in sorted(_IDS.items()) if kind is None or v.kind == kind}


def lookup(source: str, kind: str) -> BuiltinId | None:
    """The registered entry for an ``nlora:`` id of this kind; ``None`` for any other string;
    a ``UserError`` listing the known ids for an unknown ``nlora:`` id."""
    if not source.startswith(PREFIX):
        return None
    known = builtin_ids(kind)
    if source not in known:
        raise UserError(
            f"Unknown built-in {kind} id '{source}'.",
            hint=f"Known built-in {kind} ids: {', '.join(known) or 'none installed'}.",
        )
    return known[source]
