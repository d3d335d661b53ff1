"""Shared fixtures: small random sky maps, the shared sample data, the survey map (built on
``helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import xarray as xr
from helpers import SHARED_DATA, SURVEY_FILE, load_survey, random_arrays

import cwtflow


@pytest.fixture
def random_maps() -> Callable[..., xr.Dataset]:
    """Factory: ``random_maps(seed, shape=(40, 56), level=, n_sources=, zero_patch=)`` -> the
    input Dataset (default 0.1 deg CAR grid) of `random_arrays`."""

    def make(seed: int, shape: tuple[int, int] = (40, 56), **kwargs) -> xr.Dataset:
        counts, background = random_arrays(seed, shape, **kwargs)
        return cwtflow.make_maps(counts, background)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared sample-data folder; the test is skipped when it is absent."""
    if not (SHARED_DATA / SURVEY_FILE).is_file():
        pytest.skip(f"shared sample data not found at {SHARED_DATA} (needs {SURVEY_FILE})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def survey_maps(shared_data: Path) -> xr.Dataset:
    """The whole Fermi survey map (101 x 2001 pixels) as an input Dataset."""
    return load_survey(shared_data / SURVEY_FILE)


@pytest.fixture(scope="session")
def survey_cutout(survey_maps: xr.Dataset) -> xr.Dataset:
    """The tutorial's cutout: 20 x 10 deg around the map centre (200 x 100 pixels)."""
    import astropy.units as u

    return cwtflow.cutout(
        survey_maps, cwtflow.map_center(survey_maps), u.Quantity([20.0, 10.0], "deg")
    )
