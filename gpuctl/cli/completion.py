"""``gpuctl completion bash|zsh|fish``: print the shell completion script.

The scripts shipped in ``completions/`` (installed as wheel shared-data) are exactly what
this prints: both come from Typer's generator for the program name ``gpuctl``, and a test
fails when a shipped script goes stale.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

__all__ = ["Shell", "completion", "script"]

PROG = "gpuctl"
COMPLETE_VAR = "_GPUCTL_COMPLETE"


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def script(shell: Shell) -> str:
    """The completion script for ``shell``, as Typer generates it for ``gpuctl``."""
    from typer._completion_shared import get_completion_script

    text = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell.value)
    return text + "\n"


def completion(
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the completion script for SHELL.

    Install it, e.g.: gpuctl completion bash > ~/.local/share/bash-completion/completions/gpuctl
    """
    typer.echo(script(shell), nl=False)
