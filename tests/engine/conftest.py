"""Fixtures for engine scenarios: ``fleet`` is a fresh simulated world per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .world import Fleet


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    world = Fleet(tmp_path / "state")
    try:
        yield world
    finally:
        await world.close()
