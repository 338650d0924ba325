"""Options and error handling shared by the subcommands."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from naruto_lora.util.errors import UserError, as_user_error


def _debug_requested(argv: list[str] | None) -> bool:
    import sys

    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("NLORA_DEBUG") == "1"


def print_user_error(exc: UserError) -> None:
    from rich.markup import escape

    from naruto_lora.util.console import err_console

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)


def user_error_exit(exc: Exception, debug: bool) -> int | None:
    """The one place an error becomes a message: a ``UserError``, or a fault of the machine or
    the input files (a full disk, a read-only folder, an unsafe pickle), is printed as one
    paragraph (after the traceback with ``--debug``) and gives its exit code; anything else is
    a bug and gives ``None`` (the caller re-raises)."""
    from naruto_lora.util.console import err_console

    user_error = as_user_error(exc)
    if user_error is None:
        return None
    if debug:
        err_console.print_exception()
    print_user_error(user_error)
    return user_error.exit_code


def run_guarded(cli: click.Group, argv: list[str] | None = None) -> int:
    """Run the CLI as ``nlora``: click's own exits and aborts, and ``user_error_exit``."""
    from naruto_lora.util.console import err_console

    try:
        result = cli.main(args=argv, prog_name="nlora", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        err_console.print("[red]Aborted.[/]")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except Exception as exc:
        code = user_error_exit(exc, _debug_requested(argv))
        if code is None:
            raise
        return code
    # With standalone_mode=False click returns ctx.exit()'s code instead of raising.
    return result if isinstance(result, int) else 0


class NloraGroup(click.Group):
    """The root ``nlora`` group: errors of every subcommand go through ``user_error_exit`` here,
    so click's CliRunner (the tests) sees the same messages and exit codes as ``nlora``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise  # run_guarded prints the traceback, then the message
            code = user_error_exit(exc, debug=False)
            if code is None:
                raise
            ctx.exit(code)


def profile_options(func: Callable) -> Callable:
    """--profile, --set, --enable/--disable and the shorthands, for every phase command."""
    options = [
        click.option(
            "--profile",
            "-p",
            "profile_name",
            default="14gb",
            show_default=True,
            help="Built-in profile name (14gb, 12gb, 8gb, tiny, ...) or a path to a .toml file.",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY.PATH=VALUE",
            help="Override one profile key; the value is parsed as TOML. Repeatable.",
        ),
        click.option(
            "--enable", multiple=True, metavar="PLUGIN", help="Turn a plugin on. Repeatable."
        ),
        click.option(
            "--disable", multiple=True, metavar="PLUGIN", help="Turn a plugin off. Repeatable."
        ),
        click.option(
            "--model",
            default=None,
            help="Base model: hub id or local diffusers folder (model.pretrained).",
        ),
        click.option(
            "--vae",
            default=None,
            help="VAE: hub id or local folder; '' = the model's own (model.vae).",
        ),
        click.option(
            "--data", default=None, help="Data set: hub id or local folder (data.source)."
        ),
        click.option("--output", default=None, help="Training output folder (train.output_dir)."),
        click.option("--cache-dir", default=None, help="Cache folder (cache.dir)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_profile_from_options(kwargs: dict[str, Any]):
    """Pop the profile options from a command's kwargs and resolve the profile."""
    import json

    from naruto_lora.config.profile import SHORTHANDS
    from naruto_lora.plugins.manager import load_profile

    overrides = list(kwargs.pop("overrides", ()))
    for option, key in SHORTHANDS.items():
        value = kwargs.pop(option, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return load_profile(
        kwargs.pop("profile_name"),
        overrides=overrides,
        enable=kwargs.pop("enable", ()),
        disable=kwargs.pop("disable", ()),
    )
