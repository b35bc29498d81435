"""The `dcnc` command line: thin Typer commands that parse options, call one library function and print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from toolkit import __version__
from toolkit.errors import DcncError, GateFailed

app = typer.Typer(
    name="dcnc",
    help="Deployment compiler for DCNv2 recommender towers: export, build, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DcncError into one red line and exit 2, GateFailed into its message and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DcncError as err:
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except GateFailed as err:
            console.print(f"[red]FAILED:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"dcnc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Deployment compiler for DCNv2 recommender towers: export, build, verify."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
