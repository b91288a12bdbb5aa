"""The ``cineray`` command line: a thin entry point over the library.

Adding a command (the pattern every subcommand follows):

    @app.command()
    def train(
        component: str = typer.Argument(..., help="vae | denoiser | ..."),
        config: ConfigOption = "tiny",
        overrides: SetOption = None,
    ):
        \"\"\"One line that shows in `cineray --help`.\"\"\"
        cfg = resolve_config(config, overrides)       # typed CinerayConfig (plain dataclasses)
        from cineray.jobs.train import train as run   # import heavy modules inside the command
        start_ray()                                   # entry points start Ray, libraries never do
        run(component, cfg)

Commands raise ordinary exceptions; ``UserError`` (ConfigError included), ``ValueError`` and
file errors become ``error: <message>`` on stderr with exit code 2 (``--debug``: full traceback).
Keep each command a few lines: parse, build, call the library.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from cineray import __version__
from cineray.errors import UserError

# Exceptions that mean "bad input or environment": one line, exit code 2, no traceback.
USER_ERRORS = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
EXIT_USER_ERROR = 2


class _Group(TyperGroup):
    """Root command group: turns user errors raised by any subcommand into one stderr line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.meta.get("cineray.debug"):
                raise
            message = str(e).strip() or type(e).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(
    name="cineray",
    cls=_Group,
    help="Distributed text-to-video rendering on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # --debug shows a plain traceback
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Shared options: every command that needs a config takes exactly these two.
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config", "-c", help="Preset name in configs/ (tiny, base) or a path to a .yaml file."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one key, e.g. --set world.frames=9 (repeatable).",
        metavar="KEY=VALUE",
    ),
]


def resolve_config(config: str, overrides: list[str] | None):
    """The typed CinerayConfig for ``--config`` and ``--set`` (raises ConfigError)."""
    from cineray.config import load_config

    return load_config(config, overrides or ())


def start_ray() -> None:
    """Connect to the Ray cluster at RAY_ADDRESS (or one running on this machine), else start a
    local one. Only entry points call this; library code never calls ray.init()."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cineray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Distributed text-to-video rendering on Ray."""
    ctx.meta["cineray.debug"] = debug


@config_app.command("show")
def config_show(config: ConfigOption = "tiny", overrides: SetOption = None) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    from cineray.config import to_yaml

    typer.echo(to_yaml(resolve_config(config, overrides)), nl=False)


if __name__ == "__main__":  # python -m cineray.cli
    sys.exit(app())
