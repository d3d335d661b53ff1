"""Source catalog: per-island numerics, detection on synthetic skies, deblending, lazy states,
the all-sky seam, outputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS
from regions import CircleSkyRegion, Regions

import cwtflow
from cwtflow import peaks
from cwtflow.catalog import CATALOG_COLUMNS, find_sources
from cwtflow.catalog_files import read_catalog, write_catalog
from cwtflow.errors import InputError, StoreError

KERNELS = cwtflow.CWTKernels(n_scale=2, min_scale=1.5, step_scale=2.0)


def gaussian(shape, x0, y0, sigma, total):
    """Expected counts of a circular Gaussian source (pixel-centre sampling)."""
    y, x = np.indices(shape, dtype=np.float64)
    r2 = (x - x0) ** 2 + (y - y0) ** 2
    return total * np.exp(-r2 / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def sky(sources, *, shape=(64, 96), level=0.3, seed=0, exposure=None, wcs=None):
    """Poisson counts of ``sources`` [(x, y, sigma, counts)] over a flat background."""
    rate = np.full(shape, level)
    for x0, y0, sigma, total in sources:
        rate += gaussian(shape, x0, y0, sigma, total)
    counts = np.random.default_rng(seed).poisson(rate).astype(np.float64)
    return cwtflow.make_maps(counts, np.full(shape, level), wcs, exposure=exposure)


def run(data, kernels=KERNELS):
    return cwtflow.CWT(kernels, significance_threshold=3.0).analyze(data)


# ------------------------------------------------------------------------------------------
# per-island numerics


def test_template_significance_one_pixel_is_li_ma_known_background():
    n, b = 30.0, 12.0
    sig, amplitude = peaks.template_significance(np.array([n]), np.array([b]), np.array([1.0]))
    expected = math.sqrt(2 * (n * math.log(n / b) - (n - b)))
    assert sig == pytest.approx(expected, rel=1e-9)
    assert amplitude == pytest.approx(n - b, rel=1e-9)  # the fitted source counts


def test_template_significance_deficit_and_empty_template():
    assert peaks.template_significance(np.array([2.0]), np.array([5.0]), np.array([1.0])) == (
        0.0,
        0.0,
    )
    assert peaks.template_significance(np.array([9.0]), np.array([5.0]), np.array([0.0])) == (
        0.0,
        0.0,
    )
    sig, _ = peaks.template_significance(np.array([3.0]), np.array([0.0]), np.array([1.0]))
    assert sig == math.inf


def test_template_significance_fits_the_amplitude():
    rng = np.random.default_rng(3)
    shape = (25, 25)
    template = gaussian(shape, 12, 12, 1.5, 1.0).ravel()
    background = np.full(template.size, 0.2)
    counts = rng.poisson(background + 400 * template).astype(float)
    sig, amplitude = peaks.template_significance(counts, background, template)
    assert amplitude == pytest.approx(400, rel=0.1)
    grid = np.linspace(0.5 * amplitude, 1.5 * amplitude, 201)
    loglike = [np.sum(counts * np.log(background + a * template) - a * template) for a in grid]
    assert abs(grid[int(np.argmax(loglike))] - amplitude) <= grid[1] - grid[0]
    assert sig > 20


def test_ascent_basins_and_merge_split_two_peaks_and_join_a_shoulder():
    shape = (21, 41)
    image = gaussian(shape, 10, 10, 2.0, 100) + gaussian(shape, 28, 10, 2.0, 60)
    mask = image > 0.05
    basins = peaks.ascent_basins(image, mask)
    assert set(np.unique(basins[mask])) == {10 * 41 + 10, 10 * 41 + 28}
    assert np.all(basins[~mask] == -1)
    labels = peaks._components(mask, image, deblend=True, contrast=0.2, min_separation=3)
    assert labels.max() == 1 and labels[10, 10] == 0 and labels[10, 28] == 1
    # a bump on the flank of a bright source is a shoulder, not a second source
    shoulder = gaussian(shape, 10, 10, 3.0, 1000) + gaussian(shape, 15, 10, 1.0, 3)
    labels = peaks._components(
        shoulder > 0.05, shoulder, deblend=True, contrast=0.2, min_separation=3
    )
    assert labels.max() == 0


def test_merge_basins_respects_min_separation():
    shape = (21, 31)
    image = gaussian(shape, 12, 10, 1.0, 50) + gaussian(shape, 17, 10, 1.0, 40)
    mask = image > 0.01
    apart = peaks._components(mask, image, deblend=True, contrast=0.1, min_separation=3)
    joined = peaks._components(mask, image, deblend=True, contrast=0.1, min_separation=6)
    assert apart.max() == 1 and joined.max() == 0


def test_position_variance_is_sigma_over_sqrt_counts_without_background():
    shape = (41, 41)
    template = gaussian(shape, 20, 20, 2.0, 1.0)
    gy, gx = np.gradient(template)
    var_x, var_y = peaks._position_variance(
        500.0, template.ravel(), np.zeros(template.size), gx.ravel(), gy.ravel()
    )
    assert math.sqrt(var_x) == pytest.approx(2.0 / math.sqrt(500), rel=0.05)
    assert var_x == pytest.approx(var_y, rel=1e-12)


# ------------------------------------------------------------------------------------------
# detection


SOURCES = [(20.3, 15.6, 1.5, 120.0), (70.8, 20.2, 1.5, 90.0), (45.1, 48.7, 2.5, 200.0)]


@pytest.fixture(scope="module")
def three_sources():
    exposure = np.full((64, 96), 2.0e10)
    data = sky(SOURCES, exposure=exposure, seed=11)
    return data, run(data)


def test_injected_sources_are_found_where_they_are(three_sources):
    data, result = three_sources
    table = find_sources(result, exposure=data["exposure"])
    assert len(table) == len(SOURCES)
    assert table.colnames == list(CATALOG_COLUMNS)
    assert list(table["id"]) == [1, 2, 3]
    assert np.all(np.diff(table["significance"]) <= 0)
    pix = 0.1  # deg per pixel of the default grid
    for x0, y0, _, _ in SOURCES:
        d = np.hypot(table["x"] - x0, table["y"] - y0)
        i = int(np.argmin(d))
        assert d[i] < 1.0
        err = table["pos_err"][i] / pix
        assert abs(table["x"][i] - x0) < 4 * err + 0.1
        assert abs(table["y"][i] - y0) < 4 * err + 0.1
        assert table["significance"][i] > 5
    # sky positions follow the map's WCS
    wcs = cwtflow.wcs_from_attrs(result.attrs)
    lon, lat = wcs.wcs_pix2world(table["x"], table["y"], 0)
    np.testing.assert_allclose(table["lon"], lon, atol=1e-10)
    np.testing.assert_allclose(table["lat"], lat, atol=1e-10)
    assert table.meta["FRAME"] == "galactic"
    assert table["lon"].unit == u.deg and table["flux"].unit == u.Unit("cm-2 s-1")


def test_extent_orders_point_and_extended_sources(three_sources):
    _, result = three_sources
    table = find_sources(result)
    extended = np.argmin(np.hypot(table["x"] - 45.1, table["y"] - 48.7))
    others = [i for i in range(len(table)) if i != extended]
    assert np.all(table["extent"][extended] > table["extent"][others])
    assert np.all(table["extent_major"] >= table["extent"])
    assert np.all(table["extent"] >= table["extent_minor"])


def test_flux_with_an_exposure_map(three_sources):
    data, result = three_sources
    with_exposure = find_sources(result, exposure=data["exposure"])
    np.testing.assert_allclose(
        with_exposure["flux"], with_exposure["source_counts"] / 2.0e10, rtol=1e-12
    )
    for x0, y0, _, total in SOURCES:
        i = int(np.argmin(np.hypot(with_exposure["x"] - x0, with_exposure["y"] - y0)))
        # counts inside the support only: a few percent of the wings are outside
        assert with_exposure["flux"][i] == pytest.approx(total / 2.0e10, rel=0.3)
    # the result carries the input's exposure and uses it by default; none at all -> NaN
    assert "exposure" in result
    np.testing.assert_array_equal(find_sources(result)["flux"], with_exposure["flux"])
    assert np.all(np.isnan(find_sources(result.drop_vars("exposure"))["flux"]))
    with pytest.raises(InputError, match="exposure shape"):
        find_sources(result, exposure=np.ones((3, 3)))
    with pytest.raises(InputError, match="negative"):
        find_sources(result, exposure=-data["exposure"])


def test_close_sources_in_one_island_are_deblended():
    pair = [(40.0, 30.0, 1.5, 150.0), (47.0, 30.5, 1.5, 110.0)]
    result = run(sky(pair, seed=5))
    table = find_sources(result)
    assert len(table) == 2
    assert table["island"][0] == table["island"][1]  # one support island
    for x0, y0, _, _ in pair:
        assert np.min(np.hypot(table["x"] - x0, table["y"] - y0)) < 1.5
    single = find_sources(result, deblend=False)
    assert len(single) == 1
    assert single["source_counts"][0] > max(table["source_counts"])


def test_nothing_found_warns_and_returns_the_empty_table():
    result = run(sky([], seed=2))
    with pytest.warns(UserWarning, match="no sources found"):
        table = find_sources(result, min_significance=50)
    assert len(table) == 0
    assert table.colnames == list(CATALOG_COLUMNS)
    for name, (dtype, unit, _) in CATALOG_COLUMNS.items():
        assert table[name].dtype == dtype
        assert table[name].unit == (u.Unit(unit) if unit else None)


@pytest.mark.parametrize("psf_sigma", [None, 1.5])
def test_dask_chunked_state_gives_the_identical_table(three_sources, psf_sigma):
    data, result = three_sources
    expected = find_sources(result, exposure=data["exposure"], psf_sigma=psf_sigma)
    lazy = result.chunk({"y": 24, "x": 40, "scale": 1})
    assert lazy["transform_3d"].chunks is not None
    got = find_sources(
        lazy, exposure=data["exposure"].chunk({"y": 30, "x": 50}), psf_sigma=psf_sigma
    )
    assert got.colnames == expected.colnames and len(got) == len(expected)
    for name in expected.colnames:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_point_source_likelihood_with_a_psf(three_sources):
    data, result = three_sources
    table = find_sources(result, exposure=data["exposure"], psf_sigma=1.5)
    assert len(table) == len(SOURCES)
    assert table.meta["PSFSIGMA"] == pytest.approx(0.15)
    for x0, y0, sigma, total in SOURCES:
        i = int(np.argmin(np.hypot(table["x"] - x0, table["y"] - y0)))
        if sigma == 1.5:  # the point sources: the fit recovers their counts
            assert table["source_counts"][i] == pytest.approx(total, rel=0.25)
            expected_err = 0.1 * sigma / math.sqrt(total)  # deg, no-background limit
            assert expected_err < table["pos_err"][i] < 2 * expected_err
    np.testing.assert_allclose(table["flux"], table["source_counts"] / 2.0e10, rtol=1e-12)
    # an angle is converted with the pixel size
    same = find_sources(result, exposure=data["exposure"], psf_sigma=0.15 * u.deg)
    np.testing.assert_allclose(same["significance"], table["significance"], rtol=1e-9)
    for bad in (0, -1.0, np.nan, 2 * u.s):
        with pytest.raises(InputError, match="psf_sigma"):
            find_sources(result, psf_sigma=bad)


def assert_same_catalog(got, expected):
    assert got.colnames == expected.colnames and len(got) == len(expected)
    for name in expected.colnames:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, three_sources):
    """The three-source run, written to a zarr history store."""
    data, _ = three_sources
    store = tmp_path_factory.mktemp("stored") / "run.zarr"
    state = cwtflow.CWT(KERNELS, significance_threshold=3.0).analyze(data, store=store)
    return store, state


def test_a_stored_run_gives_the_in_memory_catalog(three_sources, stored_run):
    _, result = three_sources
    store, stored = stored_run
    assert_same_catalog(find_sources(cwtflow.read_result(store)), find_sources(result))
    assert_same_catalog(find_sources(stored), find_sources(result))


def test_a_tiled_run_gives_the_in_memory_catalog(three_sources):
    pytest.importorskip("cwtflow.tiled", reason="the tiled engine step is not in this tree yet")
    data, result = three_sources
    tiled = cwtflow.CWT(KERNELS, significance_threshold=3.0).analyze(data, chunks=(32, 48))
    assert_same_catalog(find_sources(tiled), find_sources(result))


def allsky_wcs(shape):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.cdelt = [-360.0 / shape[1], 1.0]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    return wcs


def test_a_source_on_the_allsky_seam_is_one_source():
    shape = (32, 360)
    wcs = allsky_wcs(shape)
    assert cwtflow.maps.is_allsky(wcs, shape)
    # the source sits on the seam: half of it at x ~ 359.5, half at x ~ -0.5
    rate = np.full(shape, 0.3)
    for shift in (0.0, 360.0):
        rate += gaussian(shape, -0.4 + shift, 16.0, 1.5, 80.0)
    counts = np.random.default_rng(4).poisson(rate).astype(float)
    data = cwtflow.make_maps(counts, np.full(shape, 0.3), wcs)
    result = run(data)
    for psf_sigma in (None, 1.5):  # the likelihood window crosses the seam too
        table = find_sources(result, psf_sigma=psf_sigma)
        assert len(table) == 1
        x = table["x"][0]
        assert min(abs(x - 359.6), abs(x + 0.4)) < 0.7
        assert -0.5 <= x < 359.5
        lon = table["lon"][0]
        expected_lon = wcs.wcs_pix2world(-0.4, 16.0, 0)[0] % 360
        assert abs((lon - expected_lon + 180) % 360 - 180) < 0.7
        assert table["source_counts"][0] == pytest.approx(80, rel=0.35)
        # identical through dask chunks that split the map at the seam's neighbours
        lazy = find_sources(result.chunk({"x": 90}), psf_sigma=psf_sigma)
        for name in table.colnames:
            np.testing.assert_array_equal(lazy[name], table[name], err_msg=name)


def test_bad_input_is_refused_with_a_clear_error(three_sources):
    _, result = three_sources
    with pytest.raises(InputError, match=r"xarray\.Dataset"):
        find_sources(result["model"])
    with pytest.raises(InputError, match="missing support"):
        find_sources(result.drop_vars("support"))
    with pytest.raises(InputError, match="contrast"):
        find_sources(result, contrast=1.5)
    with pytest.raises(InputError, match="min_separation"):
        find_sources(result, min_separation=-1)
    with pytest.raises(InputError, match="do not match"):
        find_sources(result, kernels=cwtflow.CWTKernels(2, 1.0, 2.0))
    bare = result.copy()
    bare.attrs = {"wcs": result.attrs["wcs"]}
    np.testing.assert_array_equal(find_sources(bare)["x"], find_sources(result)["x"])


# ------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("name", ["sources.fits", "sources.fits.gz", "sources.ecsv"])
def test_catalog_round_trip(tmp_path, three_sources, name):
    data, result = three_sources
    table = find_sources(result, exposure=data["exposure"])
    path = write_catalog(table, tmp_path / name)
    back = read_catalog(path)
    assert back.colnames == table.colnames
    for column in table.colnames:
        np.testing.assert_array_equal(back[column], table[column], err_msg=column)
        assert back[column].unit == table[column].unit
    assert back.meta["FRAME"] == "galactic"
    assert back.meta["MINSIG"] == table.meta["MINSIG"]
    with pytest.raises(StoreError, match="exists"):
        write_catalog(table, path)
    write_catalog(table[:1], path, overwrite=True)
    assert len(read_catalog(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary files left


def test_region_file_round_trip(tmp_path, three_sources):
    _, result = three_sources
    table = find_sources(result)
    path = write_catalog(table, tmp_path / "sources.reg")
    shapes = Regions.read(str(path), format="ds9")
    assert len(shapes) == len(table)
    for shape, row in zip(shapes, table, strict=True):
        assert isinstance(shape, CircleSkyRegion)
        center = shape.center.galactic
        assert center.l.deg == pytest.approx(row["lon"], abs=1e-6)
        assert center.b.deg == pytest.approx(row["lat"], abs=1e-6)
        assert shape.radius.to_value(u.deg) == pytest.approx(row["extent"], rel=1e-6)
        assert str(shape.meta["text"]) == str(row["id"])
    with pytest.raises(StoreError, match="exists"):
        write_catalog(table, path)
    cwtflow.write_regions(table, path, radius=0.2 * u.deg, overwrite=True)
    assert all(s.radius.to_value(u.deg) == pytest.approx(0.2) for s in Regions.read(str(path)))


def test_output_errors(tmp_path, three_sources):
    _, result = three_sources
    table = find_sources(result)
    with pytest.raises(InputError, match="format"):
        write_catalog(table, tmp_path / "sources.txt")
    with pytest.raises(StoreError, match="does not exist"):
        write_catalog(table, tmp_path / "missing" / "sources.fits")
    with pytest.raises(InputError, match="not a cwtflow catalog"):
        write_catalog(Table({"a": [1]}), tmp_path / "a.fits")
    with pytest.raises(InputError, match="radius"):
        cwtflow.write_regions(table, tmp_path / "a.reg", radius="size")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_catalog(table, tmp_path / "quiet.fits")  # no header-card warnings


# ------------------------------------------------------------------------------------------
# command line


def invoke(*args):
    from click.testing import CliRunner

    from cwtflow.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_catalog_from_fits_and_zarr_results(tmp_path, three_sources, stored_run):
    data, result = three_sources
    maps = cwtflow.write_maps(data, tmp_path / "maps.fits")
    state = cwtflow.write_state(result, tmp_path / "result.fits")
    out, reg = tmp_path / "sources.fits", tmp_path / "sources.reg"
    run = invoke("catalog", state, "--out", out, "--regions", reg, "--maps", maps)
    assert run.exit_code == 0, run.output
    assert run.stdout.splitlines() == [f"wrote {out} (3 sources)", f"wrote {reg}"]
    expected = find_sources(result, exposure=data["exposure"])
    got = read_catalog(out)
    for name in expected.colnames:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, err_msg=name)
    assert len(Regions.read(str(reg), format="ds9")) == 3
    # a zarr store carries its exposure; options reach find_sources
    store, _ = stored_run
    ecsv = tmp_path / "sources.ecsv"
    run = invoke("catalog", store, "-o", ecsv, "--psf-sigma", "0.15", "--min-significance", "6")
    assert run.exit_code == 0, run.output
    expected = find_sources(result, exposure=data["exposure"], psf_sigma=1.5, min_significance=6)
    got = read_catalog(ecsv)
    assert len(got) == len(expected)
    np.testing.assert_allclose(got["flux"], expected["flux"], rtol=1e-9)


def test_cli_catalog_refusals_write_nothing(tmp_path, three_sources):
    _, result = three_sources
    state = cwtflow.write_state(result, tmp_path / "result.fits")
    no_exposure = cwtflow.write_state(result.drop_vars("exposure"), tmp_path / "noexp.fits")
    existing = tmp_path / "old.fits"
    existing.write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (("catalog", state, "--out", existing), "exists"),
        (("catalog", state, "--out", tmp_path / "a.reg"), "--regions"),
        (("catalog", state, "--out", tmp_path / "a.txt"), "format"),
        (("catalog", tmp_path / "missing.fits", "--out", tmp_path / "a.fits"), "missing.fits"),
        (("catalog", state, "--out", tmp_path / "a.fits", "--maps", no_exposure), "EXPOSURE"),
    ]
    for args, word in cases:
        run = invoke(*args)
        assert run.exit_code != 0, run.output
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("cwtflow: error: "), run.stderr
        assert word in lines[0], (word, lines[0])
        assert "Traceback" not in run.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert existing.read_bytes() == b"keep"


def test_cli_catalog_with_nothing_found_warns_and_writes_the_empty_catalog(tmp_path):
    result = run(sky([], seed=2))
    state = cwtflow.write_state(result, tmp_path / "result.fits")
    out = tmp_path / "none.ecsv"
    run_ = invoke("catalog", state, "--out", out, "--min-significance", "50")
    assert run_.exit_code == 0, run_.output
    assert run_.stderr.startswith("cwtflow: warning: no sources found")
    assert run_.stdout.strip() == f"wrote {out} (0 sources)"
    assert read_catalog(out).colnames == list(CATALOG_COLUMNS)
