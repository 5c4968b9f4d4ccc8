"""``chatray`` command line: a thin click layer over the library.

No torch/ray/transformers import at module level: ``chatray --help`` must answer instantly.
Subcommand groups owned by a concern live next to it (``chatray/train/commands.py``,
``chatray/serve/commands.py``) and are attached here.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from chatray import __version__
from chatray.config import ConfigError
from chatray.errors import ChatrayError

__all__ = ["cli", "main"]


class _Root(click.Group):
    """Turns library errors into one clean line plus a hint (``--debug`` keeps the traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (ChatrayError, ConfigError, FileNotFoundError, ValueError, PermissionError, OSError) as e:
            if os.environ.get("CHATRAY_DEBUG") == "1":
                traceback.print_exc()
            click.secho(f"error: {e}", fg="red", err=True)
            hint = getattr(e, "hint", None)
            if hint:
                click.echo(f"hint: {hint}", err=True)
            elif os.environ.get("CHATRAY_DEBUG") != "1":
                click.echo("hint: rerun with --debug for the full traceback", err=True)
            sys.exit(1)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="chatray")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--verbose", "-v", is_flag=True,
              help="Show Ray's own output on the terminal (else it goes to a log file).")
def cli(debug: bool, verbose: bool) -> None:
    """chatray: fine-tune and serve GPT-2 family dialogue models on Ray.

    \b
    Typical flow:
      chatray data prepare --demo --out .demo/data --tokenizer train:4000 --max-length 64
      chatray train --config jobs/finetune_tiny.yaml
      chatray serve --checkpoint .demo/checkpoints/tiny-demo:best
      chatray chat
    """
    if debug:
        os.environ["CHATRAY_DEBUG"] = "1"
    if verbose:
        os.environ["CHATRAY_VERBOSE"] = "1"


def _attach() -> None:
    from chatray.data.commands import data
    from chatray.localcluster.commands import down, up
    from chatray.serve.commands import chat, generate, serve
    from chatray.train.commands import train

    for command in (data, train, serve, chat, generate, up, down):
        cli.add_command(command)


_attach()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="chatray")


if __name__ == "__main__":
    main()
