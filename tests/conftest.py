"""Shared fixtures: small random sky maps, the shared sample data, the survey map."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import cwtflow

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
SURVEY_FILE = "fermi_survey_gal_plane.fits.gz"


def random_arrays(
    seed: int,
    shape: tuple[int, int] = (40, 56),
    *,
    level: float = 0.6,
    n_sources: int = 4,
    zero_patch: tuple[slice, slice] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson counts over a smooth positive background with a few Gaussian sources.

    ``zero_patch`` is a region where background and counts are both exactly 0 (outside a
    survey footprint, say), so that ``E == 0`` occurs there.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y, x = np.indices(shape, dtype=np.float64)
    background = level * (1.0 + 0.4 * np.sin(x / 7.0 + rng.uniform(0, 6)) * np.cos(y / 5.0))
    rate = background.copy()
    for _ in range(n_sources):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        flux, sigma = rng.uniform(8.0, 40.0), rng.uniform(0.8, 2.0)
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        rate += flux * np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    if zero_patch is not None:
        background[zero_patch] = 0.0
        rate[zero_patch] = 0.0
    counts = rng.poisson(rate).astype(np.float64)
    return counts, background


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


def load_survey(path: Path) -> xr.Dataset:
    """The survey map's counts and background with WCS, through the public reader when the
    package has one (plain astropy + `cwtflow.make_maps` otherwise)."""
    if hasattr(cwtflow, "read_maps"):
        return cwtflow.read_maps(path)
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    with fits.open(path) as hdus, warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(hdus["COUNTS"].header)
        return cwtflow.make_maps(hdus["COUNTS"].data, hdus["BACKGROUND"].data, wcs)


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
