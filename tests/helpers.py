"""Helpers shared by the tests (imported as ``from helpers import ...``; fixtures built on them
live in ``conftest.py``): small random sky maps and the shared sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def load_survey(path: Path) -> xr.Dataset:
    """The survey map's counts and background with WCS, read by the public reader."""
    return cwtflow.read_maps(path)


def clean_whole_map(
    sig: np.ndarray,
    threshold: float,
    *,
    remove_isolated: bool,
    island_threshold: float | None,
    wrap_x: bool = False,
) -> np.ndarray:
    """`cwtflow.core.clean_mask` of one significance plane, the rule given by keywords."""
    from cwtflow import core

    rule = core.Cleaning(threshold, remove_isolated, island_threshold)
    return core.clean_mask(sig > threshold, sig, rule, wrap_x=wrap_x)


def clean_tiled(
    sig,
    threshold: float,
    *,
    remove_isolated: bool,
    island_threshold: float | None,
    wrap_x: bool = False,
):
    """`cwtflow.labels.clean_support` (dask), the rule given by keywords."""
    from cwtflow import core, labels

    rule = core.Cleaning(threshold, remove_isolated, island_threshold)
    return labels.clean_support(sig, rule, wrap_x=wrap_x)
