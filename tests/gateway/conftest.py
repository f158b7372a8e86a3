"""Gateway fixtures: ``make_world`` builds a ``World`` (see ``world.py``) per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from .world import WorldFactory, world_factory


@pytest.fixture
def make_world(tmp_path: Path) -> WorldFactory:
    return world_factory(tmp_path)
