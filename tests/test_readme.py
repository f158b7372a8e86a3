"""The README's command reference is part of the interface: it must match the real CLI."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from gpuctl.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Commands\n+```\n(.*?)```", text, re.S)
    assert match, "README.md has no '## Commands' block"
    return match.group(1)


def _cli_commands() -> dict[str, list[str]]:
    """Every leaf command ('keys create') with its long option names."""
    root = typer.main.get_command(app)
    found: dict[str, list[str]] = {}

    def walk(command: object, prefix: str) -> None:
        sub = getattr(command, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, f"{prefix} {name}".strip())
            return
        params = getattr(command, "params", [])
        found[prefix] = [
            opt for p in params for opt in getattr(p, "opts", []) if opt.startswith("--")
        ]

    walk(root, "")
    return found


def test_every_cli_command_is_in_the_readme() -> None:
    block = _readme_commands()
    for command in _cli_commands():
        group, _, leaf = command.partition(" ")
        assert f"gpuctl {group}" in block, f"README's command list lacks `gpuctl {group}`"
        if leaf:
            assert leaf in block, f"README's command list lacks `gpuctl {command}`"


def test_every_option_in_the_readme_exists() -> None:
    block = _readme_commands()
    known = {opt for opts in _cli_commands().values() for opt in opts}
    for option in set(re.findall(r"--[a-z][a-z-]*", block)):
        assert option in known, f"README lists {option}, which no command accepts"


def test_the_readme_names_the_two_front_door_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "gpuctl serve --demo" in text
    assert "pip install -e '.[test]' && pytest" in text
