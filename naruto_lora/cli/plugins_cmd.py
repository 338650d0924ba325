"""``nlora plugins list``."""

from __future__ import annotations

import click


@click.group("plugins")
def plugins() -> None:
    """Inspect the installed plugins (built-in and third-party)."""


@plugins.command("list")
@click.option(
    "--profile",
    "-p",
    "profile_name",
    default="14gb",
    show_default=True,
    help="Profile whose enabled plugins are marked.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(profile_name: str, as_json: bool) -> None:
    """Show each plugin: whether the profile enables it, its hooks and its parameters."""
    import json

    from rich.table import Table

    from naruto_lora.plugins.manager import (
        discover_plugins,
        load_profile,
        plugin_hooks,
        plugin_parameters,
    )
    from naruto_lora.util.console import console

    classes = discover_plugins()
    profile = load_profile(profile_name, plugin_classes=classes)
    rows = []
    for name, cls in sorted(classes.items()):
        settings = profile.plugins[name]
        rows.append(
            {
                "name": name,
                "enabled": settings.enabled,
                "module": cls.__module__,
                "hooks": plugin_hooks(cls),
                "parameters": {k: v for k, v in plugin_parameters(cls)},
                "profile_values": {
                    k: getattr(settings.config, k, default) for k, default in plugin_parameters(cls)
                },
                "description": getattr(cls, "description", ""),
            }
        )
    if as_json:
        click.echo(json.dumps({"profile": profile.name, "plugins": rows}, indent=2, default=str))
        return
    table = Table(title="nlora plugins")
    # Names and values are what users type: never cut them to fit the width (a pipe or
    # a file gets 80 columns); long cells wrap instead.
    longest = max((len(r["name"]) for r in rows), default=6)
    table.add_column("plugin", no_wrap=True, min_width=longest)
    table.add_column(f"in {profile.name}", no_wrap=True)
    table.add_column("hooks", overflow="fold")
    table.add_column("parameters (default -> profile)", overflow="fold")
    table.add_column("module", overflow="fold")
    for row in rows:
        params = (
            ", ".join(
                f"{k}={row['parameters'][k]!r}"
                + (f" -> {v!r}" if v != row["parameters"][k] else "")
                for k, v in row["profile_values"].items()
            )
            or "-"
        )
        table.add_row(
            row["name"],
            "[green]on[/]" if row["enabled"] else "off",
            "\n".join(row["hooks"]),
            params,
            row["module"],
        )
    console.print(table)
