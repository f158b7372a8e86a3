"""Shell completion: the shipped scripts are current, and TAB completes GPU names from the
cache of the last discovery without touching the network.

When a test here fails after a Typer upgrade or a rename, regenerate the scripts:
    for s in bash zsh fish; do gpuctl completion $s > completions/...; done
(``gpuctl.bash``, ``_gpuctl``, ``gpuctl.fish``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuctl.cli.gpucache import fast_cache_dir, write_cache
from gpuctl.config import cache_dir
from gpuctl.engine.api import GpuState, GpuView

from .conftest import Gpuctl

COMPLETIONS = Path(__file__).resolve().parents[2] / "completions"
SHIPPED = {"bash": "gpuctl.bash", "zsh": "_gpuctl", "fish": "gpuctl.fish"}


@pytest.mark.parametrize("shell", sorted(SHIPPED))
def test_shipped_script_is_what_gpuctl_completion_prints(gpuctl: Gpuctl, shell: str) -> None:
    result = gpuctl("completion", shell)

    assert result.exit_code == 0
    assert result.stdout == (COMPLETIONS / SHIPPED[shell]).read_text(), (
        f"completions/{SHIPPED[shell]} is stale: regenerate it with "
        f"`gpuctl completion {shell} > completions/{SHIPPED[shell]}`")


@pytest.mark.parametrize("shell", sorted(SHIPPED))
def test_shipped_script_matches_typers_own_generator(gpuctl: Gpuctl, shell: str) -> None:
    gpuctl.env["_GPUCTL_COMPLETE"] = f"source_{shell}"

    result = gpuctl()

    assert result.exit_code == 0
    assert result.stdout.strip() == (COMPLETIONS / SHIPPED[shell]).read_text().strip()


def test_pyproject_installs_every_shipped_script() -> None:
    pyproject = (COMPLETIONS.parent / "pyproject.toml").read_text()
    for name in SHIPPED.values():
        assert f'"completions/{name}"' in pyproject


def test_completion_rejects_an_unknown_shell(gpuctl: Gpuctl) -> None:
    result = gpuctl("completion", "tcsh")

    assert result.exit_code == 2


def _gpu(name: str, id: str) -> GpuView:
    return GpuView(id=id, name=name, state=GpuState.PAUSED, cloud_status="paused")


def test_tab_completes_gpu_names_from_the_cache(gpuctl: Gpuctl) -> None:
    write_cache(cache_dir(), [_gpu("gpu-alpha", "id-1"), _gpu("gpu-beta", "id-2"),
                              _gpu("cpu-box", "id-3")])
    gpuctl.env.update({"_GPUCTL_COMPLETE": "complete_bash",
                       "COMP_WORDS": "gpuctl resume gpu-", "COMP_CWORD": "2"})

    result = gpuctl()

    assert result.exit_code == 0
    assert result.stdout.split() == ["gpu-alpha", "gpu-beta"]


def test_tab_without_a_cache_completes_nothing_and_does_not_fail(gpuctl: Gpuctl) -> None:
    gpuctl.env.update({"_GPUCTL_COMPLETE": "complete_bash",
                       "COMP_WORDS": "gpuctl status ", "COMP_CWORD": "2"})

    result = gpuctl()

    assert result.exit_code == 0
    assert result.stdout.strip() == ""


def test_fast_cache_dir_agrees_with_the_config_module(gpuctl_home: Path) -> None:
    assert fast_cache_dir() == cache_dir() == gpuctl_home / "cache"
