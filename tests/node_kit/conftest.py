"""Fixtures for the GPU node kit tests; the helpers themselves live in ``support``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .support import EntrypointRun, StubOllama

StartEntrypoint = Callable[..., EntrypointRun]


@pytest.fixture
def stub(tmp_path: Path) -> StubOllama:
    directory = tmp_path / "stub"
    directory.mkdir()
    return StubOllama(directory)


@pytest.fixture
def start_entrypoint(stub: StubOllama) -> Iterator[StartEntrypoint]:
    """``start_entrypoint(**env) -> EntrypointRun``; every run is killed at teardown."""
    runs: list[EntrypointRun] = []

    def start(**settings: str) -> EntrypointRun:
        run = EntrypointRun(stub.env(**settings))
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()
