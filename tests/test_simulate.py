"""Simulated skies: determinism, the maps' content, and that the true sources are in the counts."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

import cwtflow
from cwtflow import InputError, simulate_sky
from cwtflow.maps import wcs_from_attrs


@pytest.fixture(scope="module")
def sky():
    return simulate_sky((100, 160), n_sources=12, seed=3, n_extended=3)


def test_same_seed_same_sky(sky):
    maps, sources = simulate_sky((100, 160), n_sources=12, seed=3, n_extended=3)
    xr.testing.assert_identical(maps, sky[0])
    assert all((sources[c] == sky[1][c]).all() for c in sources.colnames)
    other, other_sources = simulate_sky((100, 160), n_sources=12, seed=4, n_extended=3)
    assert not np.array_equal(other["counts"].values, maps["counts"].values)
    assert not np.array_equal(other_sources["x"], sources["x"])


def test_maps_content(sky):
    maps, sources = sky
    assert maps.sizes == {"y": 100, "x": 160}
    assert list(maps.data_vars) == ["counts", "background", "exposure"]
    counts = maps["counts"].values
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    background = maps["background"].values
    assert background.min() > 0
    # the band: brighter on the Galactic plane (middle rows) than at the top and bottom
    rows = background.mean(axis=1)
    assert rows[45:55].mean() > 2 * max(rows[:5].mean(), rows[-5:].mean())
    # total counts = diffuse + sources, within Poisson noise
    expected = background.sum() + float(sources["counts"].sum())
    assert abs(counts.sum() - expected) < 5 * np.sqrt(expected)
    exposure = maps["exposure"].values
    assert 0.85e11 < exposure.min() <= exposure.max() < 1.15e11
    wcs = wcs_from_attrs(maps.attrs)
    assert wcs.wcs.ctype[0] == "GLON-CAR" and wcs.wcs.cdelt[1] == 0.1
    cwtflow.validate_maps(maps)


def test_source_table(sky):
    maps, sources = sky
    assert sources.colnames == ["id", "x", "y", "lon", "lat", "counts", "flux", "extent", "sigma"]
    assert list(sources["id"]) == list(range(1, 13))
    assert str(sources["lon"].unit) == "deg" and str(sources["x"].unit) == "pix"
    wcs = wcs_from_attrs(maps.attrs)
    lon, lat = wcs.wcs_pix2world(sources["x"], sources["y"], 0)
    np.testing.assert_allclose(sources["lon"], lon % 360, atol=1e-10)
    np.testing.assert_allclose(sources["lat"], lat, atol=1e-10)
    assert np.all((sources["counts"] >= 30) & (sources["counts"] <= 500))
    extended = sources["extent"] > 0
    assert extended.sum() == 3
    assert np.all((sources["extent"][extended] >= 2) & (sources["extent"][extended] <= 4))
    np.testing.assert_allclose(sources["sigma"], np.hypot(2.0, sources["extent"]))
    pix = np.rint([sources["y"], sources["x"]]).astype(int)
    exposure = maps["exposure"].values[pix[0], pix[1]]
    np.testing.assert_allclose(sources["flux"] * exposure, sources["counts"], rtol=1e-12)
    xy = np.column_stack([sources["x"], sources["y"]])
    distances = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert distances[np.triu_indices(len(xy), 1)].min() >= 12
    assert xy.min() >= 10 and xy[:, 0].max() <= 149 and xy[:, 1].max() <= 89


def test_true_sources_are_where_the_counts_excess_is(sky):
    maps, sources = sky
    excess = maps["counts"].values - maps["background"].values
    noise = maps["background"].values
    y, x = np.indices(excess.shape)
    inside = np.zeros(excess.shape, dtype=bool)
    for src in sources:
        aperture = np.hypot(x - src["x"], y - src["y"]) <= 2 * src["sigma"]
        inside |= aperture
        expected = (1 - np.exp(-2.0)) * src["counts"]  # share of a 2-D Gaussian within 2 sigma
        sigma = np.sqrt(noise[aperture].sum() + expected)
        assert abs(excess[aperture].sum() - expected) < 5 * sigma, src["id"]
        if expected > 6 * np.sqrt(noise[aperture].sum()):
            assert excess[aperture].sum() > 3 * np.sqrt(noise[aperture].sum()), src["id"]
    # away from the sources the counts follow the background
    assert abs(excess[~inside].sum()) < 5 * np.sqrt(noise[~inside].sum())
    # the brightest sources peak where the table puts them
    smooth = ndimage.gaussian_filter(excess, 2.0)
    for src in sources[np.argsort(sources["counts"])[-3:]]:
        y0, x0 = round(src["y"]), round(src["x"])
        box = smooth[y0 - 4 : y0 + 5, x0 - 4 : x0 + 5]
        py, px = np.unravel_index(box.argmax(), box.shape)
        assert np.hypot(y0 - 4 + py - src["y"], x0 - 4 + px - src["x"]) < 1.6, src["id"]


def test_defaults_size_and_density():
    maps, sources = simulate_sky(seed=0)
    assert maps.sizes == {"y": 200, "x": 400}
    assert len(sources) == 25
    assert sources.meta["seed"] == 0 and sources.meta["psf_sigma"] == 2.0
    small, none = simulate_sky((30, 40), seed=1, binsz=0.5)
    assert small.sizes == {"y": 30, "x": 40} and len(none) == 0
    assert small.attrs["wcs"]["CDELT2"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (0, 10)}, "shape must be two positive integers"),
        ({"shape": (10,)}, "shape must be a"),
        ({"n_sources": -1}, "n_sources must be a non-negative integer"),
        ({"n_sources": 2, "n_extended": 3}, "n_extended"),
        ({"psf_sigma": 0}, "psf_sigma must be a positive number"),
        ({"binsz": np.nan}, "binsz"),
        ({"source_counts": (10, 5)}, "source_counts"),
        ({"shape": (2000, 10), "n_sources": 0}, "beyond the poles"),
        ({"shape": (30, 30), "n_sources": 40}, "cannot place 40 sources"),
        ({"shape": (15, 15), "n_sources": 1}, "too small"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        simulate_sky(**{"shape": (60, 80), **kwargs})
