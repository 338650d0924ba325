"""``nlora plugins list``."""

from __future__ import annotations

import click

from naruto_lora.cli.common import GuardedCommand


def register(cli: click.Group) -> None:
    @cli.group("plugins")
    def plugins() -> None:
        """Inspect the installed plugins (built-in and third-party)."""

    @plugins.command("list", cls=GuardedCommand)
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

        from naruto_lora.console import console
        from naruto_lora.plugins import discover_plugins, plugin_hooks, plugin_parameters
        from naruto_lora.profile import load_profile

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
                        k: getattr(settings.config, k) for k, _ in plugin_parameters(cls)
                    },
                    "description": getattr(cls, "description", ""),
                }
            )
        if as_json:
            click.echo(
                json.dumps({"profile": profile.name, "plugins": rows}, indent=2, default=str)
            )
            return
        table = Table(
            "plugin",
            f"in {profile.name}",
            "hooks",
            "parameters (default -> profile)",
            "module",
            title="nlora plugins",
        )
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
