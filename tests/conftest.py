"""Shared fixtures. Real data is read in place from ../shared/data (or $BABYLM_KD_SHARED_DATA)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BABYLM_KD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data folder; tests that need it fail loudly if it is absent."""
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA} (set BABYLM_KD_SHARED_DATA)"
    return SHARED_DATA
