"""Simulated gamma-ray skies with known sources, for demos, tests and benchmarks (numpy/astropy).

The sky is a smooth diffuse model (an isotropic floor, a Galactic-plane-like band whose height
and width vary along longitude, and a few broad clouds near the plane) plus Gaussian sources
of known positions and expected counts: point sources blurred by a Gaussian PSF, and optionally
slightly extended ones (intrinsic Gaussian extent convolved with the PSF). Counts are one
Poisson draw of the total; the background map handed to the CWT is the true diffuse model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.table import Table

from .errors import InputError
from .maps import default_wcs, make_maps

__all__ = ["simulate_sky"]

#: Pixels per source when `simulate_sky` chooses the number of sources.
SOURCE_DENSITY = 3200


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _positive(name: str, value: Any) -> float:
    if not _real(value) or not np.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if not _real(value) or not np.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _range(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
        raise InputError(f"{name} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi


def _gaussian_1d(centre: float, sigma: float, n: int) -> tuple[int, np.ndarray]:
    """Pixel-integrated unit Gaussian on pixels ``lo .. lo + len - 1`` of an axis of ``n``."""
    half = math.ceil(6 * sigma) + 1
    lo, hi = max(0, math.floor(centre) - half), min(n, math.floor(centre) + half + 2)
    edges = (np.arange(lo, hi + 1) - 0.5 - centre) / (math.sqrt(2) * sigma)
    cdf = np.array([math.erf(e) for e in edges])
    return lo, 0.5 * np.diff(cdf)


def _add_gaussian(image: np.ndarray, x: float, y: float, sigma: float, total: float) -> None:
    """Add a 2-D Gaussian of ``total`` expected counts, integrated over each pixel."""
    x0, gx = _gaussian_1d(x, sigma, image.shape[1])
    y0, gy = _gaussian_1d(y, sigma, image.shape[0])
    image[y0 : y0 + gy.size, x0 : x0 + gx.size] += total * np.outer(gy, gx)


def _diffuse(
    rng: np.random.Generator, lon: np.ndarray, lat: np.ndarray, binsz: float, level: float
) -> np.ndarray:
    """Smooth diffuse model (expected counts per pixel) on 1-D ``lon`` (x) and ``lat`` (y)."""
    lon = (lon + 180.0) % 360.0 - 180.0
    periods = rng.uniform(8.0, 60.0, size=4)
    phases = rng.uniform(0.0, 2 * np.pi, size=5)
    waves = np.cos(2 * np.pi * lon[:, None] / periods[None, :] + phases[None, :4])
    height = level * np.exp(0.35 * waves.sum(axis=1))
    width = 1.5 * np.exp(0.2 * np.cos(2 * np.pi * lon / 45.0 + phases[4]))
    model = 0.12 * level + height[None, :] * np.exp(-0.5 * (lat[:, None] / width[None, :]) ** 2)
    ny, nx = model.shape
    area = ny * nx * binsz * binsz
    for _ in range(max(2, round(area / 150.0))):
        sigma = rng.uniform(1.0, 4.0) / binsz
        x = rng.uniform(0, nx - 1)
        y = float(np.clip((ny - 1) / 2 + rng.normal(0.0, 2.5 / binsz), 0, ny - 1))
        amplitude = rng.uniform(0.15, 0.6) * level
        _add_gaussian(model, x, y, sigma, amplitude * 2 * np.pi * sigma * sigma)
    return model


def _positions(
    rng: np.random.Generator, n: int, shape: tuple[int, int], margin: float, separation: float
) -> np.ndarray:
    """``n`` (x, y) positions at least ``margin`` from the edges and ``separation`` apart."""
    ny, nx = shape
    if n and (nx - 1 < 2 * margin or ny - 1 < 2 * margin):
        raise InputError(f"map {shape} is too small for sources {margin:g} pixels from the edges")
    out = np.empty((0, 2))
    for _ in range(200 * n):
        if len(out) == n:
            break
        xy = np.array([rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)])
        if not len(out) or np.hypot(*(out - xy).T).min() >= separation:
            out = np.vstack([out, xy])
    if len(out) < n:
        raise InputError(
            f"cannot place {n} sources {separation:g} pixels apart on a {shape} map; "
            "lower n_sources or min_separation"
        )
    return out


def simulate_sky(
    shape: tuple[int, int] = (200, 400),
    *,
    n_sources: int | None = None,
    seed: int | None = None,
    psf_sigma: float = 2.0,
    binsz: float = 0.1,
    source_counts: tuple[float, float] = (30.0, 500.0),
    n_extended: int = 0,
    extent: tuple[float, float] = (2.0, 4.0),
    background_level: float = 1.0,
    exposure_level: float = 1e11,
    min_separation: float = 12.0,
    margin: float = 10.0,
) -> tuple[xr.Dataset, Table]:
    """Simulate counts, background and exposure maps of a sky with known sources.

    Parameters
    ----------
    shape : (int, int)
        Map size (ny, nx) in pixels.
    n_sources : int, optional
        Number of sources; default one per 3200 pixels (25 on the default 200 x 400 map).
    seed : int, optional
        Seed of the random generator: the same seed gives identical maps and sources.
    psf_sigma : float
        Gaussian PSF sigma in pixels.
    binsz : float
        Pixel size in degrees (Galactic CAR grid centred on (l, b) = (0, 0)); the map may not
        extend beyond the poles (``ny * binsz <= 180``).
    source_counts : (float, float)
        Range of a source's expected total counts, drawn from ``dN/dS ~ S**-2`` (many faint,
        few bright).
    n_extended : int
        How many of the sources (chosen at random) are extended, with an intrinsic Gaussian
        sigma drawn uniformly from ``extent`` (pixels) and convolved with the PSF.
    background_level : float
        Diffuse expected counts per pixel on the band's crest (before its variations); the
        isotropic floor is 0.12 times this.
    exposure_level : float
        Mean exposure (cm2 s); the exposure varies smoothly by +-10 % along longitude and only
        converts expected counts into fluxes.
    min_separation, margin : float
        Minimal distance between sources and from the map edges, in pixels.

    Returns
    -------
    maps : xarray.Dataset
        `cwtflow.make_maps` Dataset: Poisson ``counts``, ``background`` (the true diffuse model,
        expected counts), ``exposure`` (cm2 s), on (y, x) with the WCS.
    sources : astropy.table.Table
        One row per source: ``id``, ``x``, ``y`` (pixels, 0-based, pixel centres on integers),
        ``lon``, ``lat`` (deg, Galactic), ``counts`` (expected counts), ``flux`` (counts over
        the exposure at the source, cm-2 s-1), ``extent`` (intrinsic sigma, 0 for point
        sources) and ``sigma`` (observed sigma, ``hypot(psf_sigma, extent)``), both in pixels.
        ``meta`` records the simulation parameters.
    """
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be a (ny, nx) pair of integers, got {shape!r}") from None
    if ny < 1 or nx < 1 or (ny, nx) != tuple(shape):
        raise InputError(f"shape must be two positive integers, got {shape!r}")
    if n_sources is None:
        n_sources = round(ny * nx / SOURCE_DENSITY)
    n_sources = _count("n_sources", n_sources)
    n_extended = _count("n_extended", n_extended)
    if n_extended > n_sources:
        raise InputError(f"n_extended ({n_extended}) exceeds n_sources ({n_sources})")
    psf_sigma = _positive("psf_sigma", psf_sigma)
    binsz = _positive("binsz", binsz)
    background_level = _positive("background_level", background_level)
    exposure_level = _positive("exposure_level", exposure_level)
    s_min, s_max = _range("source_counts", source_counts)
    e_min, e_max = _range("extent", extent)
    margin = _non_negative("margin", margin)
    min_separation = _positive("min_separation", min_separation)
    if ny * binsz > 180:
        raise InputError(f"map of {ny} rows of {binsz:g} deg extends beyond the poles")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise InputError(f"seed must be an integer or None, got {seed!r}")

    rng = np.random.default_rng(seed)
    wcs = default_wcs((ny, nx), binsz=binsz)
    lon = wcs.wcs_pix2world(np.arange(nx, dtype=float), np.zeros(nx), 0)[0]
    lat = wcs.wcs_pix2world(np.zeros(ny), np.arange(ny, dtype=float), 0)[1]
    diffuse = _diffuse(rng, lon, lat, binsz, background_level)
    signed_lon = (lon + 180.0) % 360.0 - 180.0
    exposure_row = exposure_level * (1.0 + 0.1 * np.sin(2 * np.pi * signed_lon / 90.0))
    exposure = np.broadcast_to(exposure_row, (ny, nx)).copy()

    xy = _positions(rng, n_sources, (ny, nx), margin, min_separation)
    uniform = rng.uniform(size=n_sources)
    counts = 1.0 / (1.0 / s_min - uniform * (1.0 / s_min - 1.0 / s_max))
    extents = np.zeros(n_sources)
    chosen = rng.choice(n_sources, size=n_extended, replace=False)
    extents[chosen] = rng.uniform(e_min, e_max, size=n_extended)
    sigmas = np.hypot(psf_sigma, extents)

    sources_image = np.zeros((ny, nx))
    for (x, y), total, sigma in zip(xy, counts, sigmas, strict=True):
        _add_gaussian(sources_image, x, y, sigma, total)
    observed = rng.poisson(diffuse + sources_image).astype(np.float64)

    src_lon, src_lat = wcs.wcs_pix2world(xy[:, 0], xy[:, 1], 0) if n_sources else ([], [])
    pix = np.rint(xy).astype(int)
    flux = counts / exposure[pix[:, 1], pix[:, 0]] if n_sources else np.zeros(0)
    table = Table(
        {
            "id": np.arange(1, n_sources + 1),
            "x": xy[:, 0] * u.pix,
            "y": xy[:, 1] * u.pix,
            "lon": np.asarray(src_lon, dtype=float) % 360.0 * u.deg,
            "lat": np.asarray(src_lat, dtype=float) * u.deg,
            "counts": counts * u.ct,
            "flux": flux * u.Unit("cm-2 s-1"),
            "extent": extents * u.pix,
            "sigma": sigmas * u.pix,
        },
        meta={
            "seed": seed,
            "shape": [ny, nx],
            "psf_sigma": psf_sigma,
            "binsz": binsz,
            "frame": "galactic",
            "description": "true sources of a cwtflow.simulate_sky map",
        },
    )
    maps = make_maps(observed, diffuse, wcs, exposure=exposure)
    return maps, table
