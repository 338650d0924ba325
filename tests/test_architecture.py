"""The package's shape, as docs/architecture.md describes it: subpackages whose imports form no
circle, production code that never imports the demo, and a core that names no plugin."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import naruto_lora
from naruto_lora.plugins.manager import discover_plugins

PACKAGE = Path(naruto_lora.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every ``naruto_lora.*`` module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("naruto_lora.")}


def _subpackage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        mine = _subpackage(path)
        targets = {name.split(".")[1] for name in _imports(path)}
        targets = {t for t in targets if (PACKAGE / t).is_dir() and t != mine}
        graph.setdefault(mine, set()).update(targets)
    return graph


def test_at_most_six_top_level_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_no_import_circle_between_subpackages() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import circle: " + " -> ".join([*path, node])
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_production_code_never_imports_the_demo() -> None:
    # The demo registers its nlora: ids through an entry point; only the CLI's `nlora demo`
    # command (the top layer) and the demo itself use it.
    users = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if _subpackage(path) not in ("demo", "cli")
        and any(name.startswith("naruto_lora.demo") for name in _imports(path))
    }
    assert users == set()


# Where naming a plugin is the point: `nlora sample --ema` reads the EMA plugin's weights.
ALLOWED = {
    ("cli/lora_source.py", "ema"),
    ("lora/inject.py", "ema"),
    ("plan/memtrack.py", "huber_loss"),  # torch's aten op of that name, not the plugin
}


def test_the_core_names_no_plugin() -> None:
    names = sorted(discover_plugins())
    assert len(names) >= 11
    pattern = re.compile(
        r"""["'](?P<a>NAMES)["']|--(?:enable|disable) (?P<b>NAMES)\b|plugins\.(?P<c>NAMES)\b""".replace(
            "NAMES", "|".join(names)
        )
    )
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("demo/"):
            continue  # the demo is not the core: it picks the plugins its profile uses
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            name = match.group("a") or match.group("b") or match.group("c")
            if (rel, name) not in ALLOWED:
                found.add((rel, name))
    assert found == set()
