"""Sources larger than the extension model (`cwtflow.merge`): one large Gaussian instead of
its fragments, point sources beside it kept, the source models on windows against a direct
sum."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.wcs import WCS

import cwtflow
from cwtflow import catalog as catalog_module
from cwtflow.likelihood import source_images
from cwtflow.refine import models_on

PSF = 1.5  # pixels
SHAPE = (90, 140)
LEVEL = 0.5


def gaussian(x0, y0, sigma, total):
    y, x = np.indices(SHAPE, dtype=np.float64)
    return (
        total * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    )


def catalog(sources, seed, **options):
    """PSF-driven CWT and catalog of Poisson counts of ``sources`` [(x, y, extension, counts)]
    over a flat background (0.1 deg pixels)."""
    rate = np.full(SHAPE, LEVEL)
    for x0, y0, ext, total in sources:
        rate += gaussian(x0, y0, np.hypot(PSF, ext), total)
    counts = np.random.default_rng(seed).poisson(rate).astype(np.float64)
    maps = cwtflow.make_maps(counts, np.full(SHAPE, LEVEL))
    psf = PSF * 0.1 * u.deg
    kernels = cwtflow.CWTKernels.from_psf(psf, 0.1 * u.deg)
    result = cwtflow.CWT(kernels, psf=psf).analyze(maps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cwtflow.find_sources(result, **options)


LARGE = (70.0, 45.0, 5.0 * PSF, 900.0)  # 5 PSF sigmas: beyond the extension model's 2
BESIDE = (88.0, 40.0, 0.0, 250.0)  # a point source on the large one's flank


@pytest.mark.parametrize("seed", [1, 2])
def test_a_large_source_is_one_extended_source_and_its_neighbour_stays(seed, monkeypatch):
    table = catalog([LARGE, BESIDE], seed)
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    assert len(table) == 2, table["x", "y", "extension", "ts"]
    big = int(np.argmin(np.hypot(x - LARGE[0], y - LARGE[1])))
    point = 1 - big
    ext_px = table["extension"][big].to_value(u.deg) / 0.1
    err_px = table["extension_err"][big].to_value(u.deg) / 0.1
    assert table["extended"][big]
    assert abs(ext_px - LARGE[2]) < 3 * err_px
    assert np.hypot(x[big] - LARGE[0], y[big] - LARGE[1]) < 3 * max(
        float(table["x_err"][big].value), float(table["y_err"][big].value), 0.5
    )
    assert not table["extended"][point]
    assert np.hypot(x[point] - BESIDE[0], y[point] - BESIDE[1]) < 1.0
    # without the merge the same sky gives fragments of the large source
    monkeypatch.setattr(catalog_module, "AT_CAP", np.inf)
    assert len(catalog([LARGE, BESIDE], seed)) > 2


def test_the_merge_with_the_background_normalisation_floating():
    table = catalog([LARGE, BESIDE], 1, fit_background=True)
    assert len(table) == 2
    big = int(np.argmax(np.asarray(table["extension"])))
    ext_px = table["extension"][big].to_value(u.deg) / 0.1
    assert abs(ext_px - LARGE[2]) < 3 * table["extension_err"][big].to_value(u.deg) / 0.1


def test_sources_within_the_model_are_not_touched(monkeypatch):
    sources = [(40.0, 45.0, 1.5 * PSF, 400.0), (100.0, 45.0, 0.0, 200.0), (108.0, 47.0, 0.0, 200.0)]
    merged = catalog(sources, 3)
    monkeypatch.setattr(catalog_module, "AT_CAP", np.inf)
    plain = catalog(sources, 3)
    assert len(merged) == len(plain) == 3
    for name in ("x", "y", "ts", "extension"):
        np.testing.assert_array_equal(np.asarray(merged[name]), np.asarray(plain[name]))


@pytest.mark.parametrize("period", [None, 200])
def test_models_on_windows_are_the_sum_of_the_included_sources(period):
    rng = np.random.default_rng(5)
    n, m, size = 30, 6, 21
    params = np.column_stack(
        [rng.uniform(10, 100, n), rng.uniform(0, 200, n), rng.uniform(0, 60, n)]
    )
    sigma = rng.uniform(1.0, 6.0, n)
    include = rng.random((m, n)) < 0.5
    origin = np.column_stack([rng.integers(-5, 50, m), rng.integers(-10, 190, m)]).astype(float)
    got = models_on(params, sigma, include, origin, size, period)
    for w in range(m):
        expected = np.zeros((size, size))
        for j in np.flatnonzero(include[w]):
            x = params[j, 1] - origin[w, 1]
            for shift in (-1, 0, 1) if period else (0,):
                images = source_images(
                    params[j : j + 1, 0],
                    np.array([x + shift * (period or 0)]),
                    np.array([params[j, 2] - origin[w, 0]]),
                    sigma[j : j + 1],
                    (size, size),
                )
                expected += images[0]
        # sources are cut beyond 5 sigma of the window: at most that tail is missing
        assert np.abs(got[w] - expected).max() < 1e-4 * max(expected.max(), 1.0)


def test_a_source_larger_than_the_larger_model_is_left_as_it_was(monkeypatch):
    # with the larger model capped at 3 PSF sigmas the 5-sigma source fits L at that limit:
    # the emission is larger than any model tried, and the catalog stays as without the merge
    monkeypatch.setattr(catalog_module, "LARGE_EXTENSION_PER_SIGMA", 3.0)
    limited = catalog([LARGE, BESIDE], 1)
    monkeypatch.setattr(catalog_module, "AT_CAP", np.inf)
    plain = catalog([LARGE, BESIDE], 1)
    assert len(limited) == len(plain) > 2
    for name in ("x", "y", "ts", "extension"):
        np.testing.assert_array_equal(np.asarray(limited[name]), np.asarray(plain[name]))


def test_a_large_source_on_the_allsky_seam_is_merged_as_in_the_middle_of_the_map():
    # an all-sky CAR map of 1 deg pixels: the large source centred on the seam, then the same
    # sky rolled by half a turn (the source in the middle): one catalog, shifted by 180 deg
    shape = (60, 360)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.cdelt = [-1.0, 1.0]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [180.5, 30.5]
    y, x = np.indices(shape, dtype=np.float64)
    rate = np.full(shape, LEVEL)
    for x0, y0, ext, total in [(-0.4, 30.0, 5.0 * PSF, 900.0), (17.0, 26.0, 0.0, 250.0)]:
        dx = (x - x0 + 180) % 360 - 180
        s2 = PSF**2 + ext**2
        rate += total * np.exp(-(dx**2 + (y - y0) ** 2) / (2 * s2)) / (2 * np.pi * s2)
    counts = np.random.default_rng(6).poisson(rate).astype(np.float64)
    psf = PSF * u.deg
    kernels = cwtflow.CWTKernels.from_psf(psf, 1.0 * u.deg)
    tables = []
    for shift in (0, 180):
        maps = cwtflow.make_maps(
            np.roll(counts, shift, axis=1), np.full(shape, LEVEL), wcs.deepcopy()
        )
        assert cwtflow.maps.is_allsky(wcs, shape)
        result = cwtflow.CWT(kernels, psf=psf).analyze(maps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tables.append(cwtflow.find_sources(result))
            if shift == 0:  # the same through dask chunks split near the seam
                lazy = cwtflow.find_sources(result.chunk({"x": 90}))
                for name in ("x", "y", "ts", "extension"):
                    np.testing.assert_array_equal(
                        np.asarray(lazy[name]), np.asarray(tables[0][name])
                    )
    seam, middle = tables
    assert len(seam) == len(middle) == 2
    big = int(np.argmax(np.asarray(seam["extension"])))
    assert seam["extended"][big] and seam["extension"][big].to_value(u.deg) > 2 * PSF
    x_seam = float(seam["x"][big].value)
    assert -0.5 <= x_seam < 359.5 and min(x_seam, 360 - x_seam) < 2.0
    for name in ("y", "ts", "extension", "source_counts"):
        np.testing.assert_allclose(
            np.asarray(seam[name]), np.asarray(middle[name]), rtol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(
        (np.asarray(seam["x"]) + 180) % 360, np.asarray(middle["x"]), atol=1e-6
    )
