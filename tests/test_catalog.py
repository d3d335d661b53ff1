"""Source catalog: per-island numerics, detection on synthetic skies, deblending, lazy states,
the all-sky seam, outputs."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable, Table
from astropy.wcs import WCS
from regions import CircleSkyRegion, EllipseSkyRegion, Regions

import cwtflow
from cwtflow import peaks
from cwtflow import psf as PSF_MODULE
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

PSF = 0.15 * u.deg  # 1.5 px on the default 0.1 deg grid
SOURCES = [(20.3, 15.6, 1.5, 120.0), (70.8, 20.2, 1.5, 90.0), (45.1, 48.7, 2.5, 200.0)]


def v(column):
    """A catalog column's numbers (Quantity or plain)."""
    return np.asarray(getattr(column, "value", column))


@pytest.fixture(scope="module")
def three_sources():
    exposure = np.full((64, 96), 2.0e10)
    data = sky(SOURCES, exposure=exposure, seed=11)
    return data, run(data)


def nearest(table, x0, y0):
    d = np.hypot(v(table["x"]) - x0, v(table["y"]) - y0)
    return int(np.argmin(d)), float(d.min())


def test_injected_sources_are_found_where_they_are(three_sources):
    data, result = three_sources
    table = find_sources(result, psf=PSF, exposure=data["exposure"])
    assert isinstance(table, QTable)
    assert len(table) == len(SOURCES)
    assert [c for c in table.colnames if c != "sky_centroid"] == list(CATALOG_COLUMNS)
    assert list(table["id"]) == [1, 2, 3]
    assert np.all(np.diff(v(table["ts"])) <= 0)
    for x0, y0, _, _ in SOURCES:
        i, d = nearest(table, x0, y0)
        assert d < 1.0
        assert abs(v(table["x"])[i] - x0) < 4 * v(table["x_err"])[i] + 0.05
        assert abs(v(table["y"])[i] - y0) < 4 * v(table["y_err"])[i] + 0.05
        assert table["significance"][i] > 5
    # sky positions follow the map's WCS
    wcs = cwtflow.wcs_from_attrs(result.attrs)
    lon, lat = wcs.wcs_pix2world(v(table["x"]), v(table["y"]), 0)
    np.testing.assert_allclose(v(table["lon"]), lon, atol=1e-10)
    np.testing.assert_allclose(v(table["lat"]), lat, atol=1e-10)
    assert table.meta["FRAME"] == "galactic"
    assert isinstance(table["sky_centroid"], SkyCoord)
    np.testing.assert_allclose(table["sky_centroid"].l.deg, v(table["lon"]), atol=1e-10)
    np.testing.assert_allclose(table["sky_centroid"].icrs.ra.deg, v(table["ra"]), atol=1e-8)


def test_every_column_has_its_unit(three_sources):
    data, result = three_sources
    table = find_sources(result, psf=PSF, exposure=data["exposure"])
    for name, (_, unit, _) in CATALOG_COLUMNS.items():
        if unit is None:
            assert not isinstance(table[name], u.Quantity), name
        else:
            assert table[name].unit == u.Unit(unit), name
    assert table["flux"].unit == u.Unit("cm-2 s-1")
    assert table["pos_err_95"].unit == u.deg and table["extension"].unit == u.deg
    ratio = v(table["pos_err_95"]) / v(table["pos_err_68"])
    np.testing.assert_allclose(ratio, math.sqrt(-2 * math.log(0.05) / -2 / math.log(0.3173)))
    assert table["extended"].dtype == bool


def test_extension_separates_point_and_extended_sources(three_sources):
    _, result = three_sources
    table = find_sources(result, psf=PSF)
    ext, _ = nearest(table, 45.1, 48.7)
    assert table["extended"][ext]
    # intrinsic sigma hypot(2.5, 1.5)-1.5 -> 2.0 px = 0.2 deg, within 3 errors
    err = v(table["extension_err"])[ext]
    assert abs(v(table["extension"])[ext] - 0.2) < 3 * err + 0.02
    others = [i for i in range(len(table)) if i != ext]
    assert not np.any(table["extended"][others])
    point = find_sources(result, psf=PSF, fit_extension=False)
    assert not np.any(point["extended"]) and np.all(v(point["extension"]) == 0)


def test_flux_with_an_exposure_map(three_sources):
    data, result = three_sources
    table = find_sources(result, psf=PSF, exposure=data["exposure"])
    np.testing.assert_allclose(v(table["flux"]), v(table["source_counts"]) / 2.0e10, rtol=1e-9)
    np.testing.assert_allclose(
        v(table["flux_err"]), v(table["source_counts_err"]) / 2.0e10, rtol=1e-9
    )
    for x0, y0, _, total in SOURCES:
        i, _ = nearest(table, x0, y0)
        err = v(table["source_counts_err"])[i]
        assert abs(v(table["source_counts"])[i] - total) < 4 * err
    # the result carries the input's exposure and uses it by default; none at all -> NaN
    assert "exposure" in result
    np.testing.assert_array_equal(v(find_sources(result, psf=PSF)["flux"]), v(table["flux"]))
    assert np.all(np.isnan(v(find_sources(result.drop_vars("exposure"), psf=PSF)["flux"])))
    with pytest.raises(InputError, match="exposure shape"):
        find_sources(result, exposure=np.ones((3, 3)))
    with pytest.raises(InputError, match="negative"):
        find_sources(result, exposure=-data["exposure"])


def test_close_sources_in_one_island_are_deblended():
    pair = [(40.0, 30.0, 1.5, 150.0), (47.0, 30.5, 1.5, 110.0)]
    result = run(sky(pair, seed=5))
    table = find_sources(result, psf=PSF)
    assert len(table) == 2
    assert table["island"][0] == table["island"][1]  # one support island
    for x0, y0, _, total in pair:
        i, d = nearest(table, x0, y0)
        assert d < 1.0
        assert abs(v(table["source_counts"])[i] - total) < 4 * v(table["source_counts_err"])[i]
    single = find_sources(result, psf=PSF, deblend=False, fit_extension=False)
    assert len(single) == 1


def test_nothing_found_warns_and_returns_the_empty_table():
    result = run(sky([], seed=2))
    with pytest.warns(UserWarning, match="no sources found"):
        table = find_sources(result, psf=PSF, min_significance=50)
    assert len(table) == 0
    assert [c for c in table.colnames if c != "sky_centroid"] == list(CATALOG_COLUMNS)
    for name, (dtype, unit, _) in CATALOG_COLUMNS.items():
        assert table[name].dtype == dtype
        if unit is not None:
            assert table[name].unit == u.Unit(unit)


def test_the_psf_comes_from_the_argument_the_run_or_the_kernels(three_sources):
    data, result = three_sources
    assert find_sources(result, psf=PSF).meta["PSFFROM"] == "given"
    assert find_sources(result).meta["PSFFROM"] == "kernels"  # min_scale 1.5 px -> 1.5 px
    kernels = cwtflow.CWTKernels.from_psf(PSF, 0.1 * u.deg)
    recorded = cwtflow.CWT(kernels, psf=PSF).analyze(data)
    assert recorded.attrs["parameters"]["psf_sigma_deg"] == pytest.approx(0.15)
    table = find_sources(recorded)
    assert table.meta["PSFFROM"] == "run" and table.meta["PSFSIGMA"] == pytest.approx(0.15)
    # r68 and a profile give the same Gaussian
    r68 = PSF_MODULE.PSF.from_r68(PSF * PSF_MODULE.R68_PER_SIGMA)
    assert r68.sigma.to_value(u.deg) == pytest.approx(0.15)
    radius = np.linspace(0, 1.0, 2001) * u.deg
    profile = np.exp(-0.5 * (radius / PSF).to_value("") ** 2)
    assert PSF_MODULE.PSF.from_profile(radius, profile).sigma.to_value(u.deg) == pytest.approx(
        0.15, rel=1e-3
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d, r: find_sources(r, psf=0.15), "psf: give an angle, e.g. 0.15 * u.deg"),
        (lambda d, r: find_sources(r, psf=2 * u.s), "psf: give an angle"),
        (lambda d, r: find_sources(r, psf=-0.1 * u.deg), "positive"),
        (lambda d, r: find_sources(r, min_separation=3), "min_separation: give an angle"),
        (lambda d, r: cwtflow.CWT(KERNELS, psf=1.5), "psf: give an angle"),
        (
            lambda d, r: cwtflow.CWTKernels.from_psf(0.15 * u.deg, 0.1),
            "pixel_size: give an angle",
        ),
        (lambda d, r: cwtflow.CWTKernels(2, 0.6 * u.deg, 1.3), "from_psf"),
        (lambda d, r: cwtflow.cutout(d, cwtflow.map_center(d), (2, 1)), "width: give an angle"),
    ],
)
def test_bare_numbers_for_angles_are_refused(three_sources, call, message):
    data, result = three_sources
    with pytest.raises(InputError, match=re.escape(message)):
        call(data, result)


def test_kernels_from_the_psf_keep_pixel_scales():
    kernels = cwtflow.CWTKernels.from_psf(0.15 * u.deg, 0.1 * u.deg)
    rule = PSF_MODULE.MIN_SCALE_PER_SIGMA
    assert kernels == cwtflow.CWTKernels(2, rule * 1.5, 2.0)
    same = cwtflow.CWTKernels.from_psf(9 * u.arcmin, 0.05 * u.deg)
    assert same.min_scale == pytest.approx(rule * 3)


@pytest.mark.parametrize("psf", [None, PSF])
def test_dask_chunked_state_gives_the_identical_table(three_sources, psf):
    data, result = three_sources
    expected = find_sources(result, exposure=data["exposure"], psf=psf)
    lazy = result.chunk({"y": 24, "x": 40, "scale": 1})
    assert lazy["transform_3d"].chunks is not None
    got = find_sources(lazy, exposure=data["exposure"].chunk({"y": 30, "x": 50}), psf=psf)
    assert got.colnames == expected.colnames and len(got) == len(expected)
    for name in CATALOG_COLUMNS:
        np.testing.assert_array_equal(v(got[name]), v(expected[name]), err_msg=name)


def assert_same_catalog(got, expected):
    assert got.colnames == expected.colnames and len(got) == len(expected)
    for name in CATALOG_COLUMNS:
        np.testing.assert_allclose(
            v(got[name]), v(expected[name]), rtol=1e-9, atol=1e-9, err_msg=name
        )


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
    for psf in (None, 1.5 * u.deg):  # the likelihood window crosses the seam too
        table = find_sources(result, psf=psf)
        assert len(table) == 1
        x = v(table["x"])[0]
        assert min(abs(x - 359.6), abs(x + 0.4)) < 0.7
        assert -0.5 <= x < 359.5
        lon = v(table["lon"])[0]
        expected_lon = wcs.wcs_pix2world(-0.4, 16.0, 0)[0] % 360
        assert abs((lon - expected_lon + 180) % 360 - 180) < 0.7
        assert v(table["source_counts"])[0] == pytest.approx(80, rel=0.35)
        # identical through dask chunks that split the map at the seam's neighbours
        lazy = find_sources(result.chunk({"x": 90}), psf=psf)
        for name in CATALOG_COLUMNS:
            np.testing.assert_array_equal(v(lazy[name]), v(table[name]), err_msg=name)


def test_bad_input_is_refused_with_a_clear_error(three_sources):
    _, result = three_sources
    with pytest.raises(InputError, match=r"xarray\.Dataset"):
        find_sources(result["model"])
    with pytest.raises(InputError, match="missing support"):
        find_sources(result.drop_vars("support"))
    with pytest.raises(InputError, match="contrast"):
        find_sources(result, contrast=1.5)
    with pytest.raises(InputError, match="min_separation"):
        find_sources(result, min_separation=-1 * u.deg)
    with pytest.raises(InputError, match="do not match"):
        find_sources(result, kernels=cwtflow.CWTKernels(2, 1.0, 2.0))
    bare = result.copy()
    bare.attrs = {"wcs": result.attrs["wcs"]}
    np.testing.assert_array_equal(v(find_sources(bare)["x"]), v(find_sources(result)["x"]))


# ------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("name", ["sources.fits", "sources.fits.gz", "sources.ecsv"])
def test_catalog_round_trip(tmp_path, three_sources, name):
    data, result = three_sources
    table = find_sources(result, psf=PSF, exposure=data["exposure"])
    path = write_catalog(table, tmp_path / name)
    back = read_catalog(path)
    assert isinstance(back, QTable)
    assert back.colnames == table.colnames
    for column in CATALOG_COLUMNS:
        np.testing.assert_array_equal(v(back[column]), v(table[column]), err_msg=column)
        assert getattr(back[column], "unit", None) == getattr(table[column], "unit", None)
    assert isinstance(back["sky_centroid"], SkyCoord)
    np.testing.assert_allclose(back["sky_centroid"].l.deg, v(table["lon"]), atol=1e-12)
    if "fits" in name:  # TUNIT cards
        from astropy.io import fits

        header = fits.getheader(path, 1)
        units = {
            header[f"TTYPE{i}"]: header.get(f"TUNIT{i}")
            for i in range(1, 200)
            if f"TTYPE{i}" in header
        }
        assert u.Unit(units["flux"]) == u.Unit("cm-2 s-1") and units["pos_err_95"] == "deg"
        assert units["x"] == "pix" and u.Unit(units["source_counts"]) == u.ct
    assert back.meta["FRAME"] == "galactic"
    assert back.meta["MINSIG"] == table.meta["MINSIG"]
    with pytest.raises(StoreError, match="exists"):
        write_catalog(table, path)
    write_catalog(table[:1], path, overwrite=True)
    assert len(read_catalog(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary files left


def test_region_file_has_95_percent_circles_and_extension_ellipses(tmp_path, three_sources):
    _, result = three_sources
    table = find_sources(result, psf=PSF)
    path = write_catalog(table, tmp_path / "sources.reg")
    shapes = Regions.read(str(path), format="ds9")
    circles = [s for s in shapes if isinstance(s, CircleSkyRegion)]
    ellipses = [s for s in shapes if isinstance(s, EllipseSkyRegion)]
    assert len(circles) == len(table)
    assert len(ellipses) == int(np.sum(table["extended"])) >= 1
    for shape, row in zip(circles, table, strict=True):
        center = shape.center.galactic
        assert center.l.deg == pytest.approx(row["lon"].value, abs=1e-6)
        assert center.b.deg == pytest.approx(row["lat"].value, abs=1e-6)
        assert shape.radius.to_value(u.deg) == pytest.approx(
            max(row["pos_err_95"].value, 0.05), rel=1e-6
        )
        assert str(shape.meta["text"]) == str(row["id"])
    ext = table[table["extended"]]
    for shape, row in zip(ellipses, ext, strict=True):
        assert shape.width.to_value(u.deg) == pytest.approx(2 * row["extension"].value, rel=1e-6)
    with pytest.raises(StoreError, match="exists"):
        write_catalog(table, path)
    cwtflow.write_regions(table, path, radius=0.2 * u.deg, overwrite=True)
    circles = [s for s in Regions.read(str(path)) if isinstance(s, CircleSkyRegion)]
    assert all(s.radius.to_value(u.deg) == pytest.approx(0.2) for s in circles)
    with pytest.raises(InputError, match="radius: give an angle"):
        cwtflow.write_regions(table, path, radius=0.2, overwrite=True)


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
    for name in CATALOG_COLUMNS:
        np.testing.assert_allclose(v(got[name]), v(expected[name]), rtol=1e-12, err_msg=name)
    circles = [s for s in Regions.read(str(reg), format="ds9") if isinstance(s, CircleSkyRegion)]
    assert len(circles) == 3
    # a zarr store carries its exposure; options reach find_sources
    store, _ = stored_run
    ecsv = tmp_path / "sources.ecsv"
    run = invoke("catalog", store, "-o", ecsv, "--psf", "0.15deg", "--min-significance", "6")
    assert run.exit_code == 0, run.output
    expected = find_sources(result, exposure=data["exposure"], psf=PSF, min_significance=6)
    got = read_catalog(ecsv)
    assert len(got) == len(expected)
    np.testing.assert_allclose(v(got["flux"]), v(expected["flux"]), rtol=1e-9)
    bare = invoke("catalog", store, "-o", tmp_path / "b.ecsv", "--psf", "0.15", "--overwrite")
    assert bare.exit_code != 0 and "give an angle" in bare.output


@pytest.mark.slow
def test_cli_run_with_the_psf_only_then_catalog(tmp_path, three_sources):
    data, _ = three_sources
    maps = cwtflow.write_maps(data, tmp_path / "maps.fits")
    store = tmp_path / "run.zarr"
    done = invoke("run", maps, "--out", store, "--psf", "0.15deg", "-q")
    assert done.exit_code == 0, done.output
    params = cwtflow.open_history(store).parameters
    assert params["psf_sigma_deg"] == pytest.approx(0.15)
    expected = (2, PSF_MODULE.MIN_SCALE_PER_SIGMA * 1.5, 2.0)
    assert (params["n_scale"], params["min_scale"], params["step_scale"]) == expected
    out = tmp_path / "sources.ecsv"
    done = invoke("catalog", store, "--out", out)
    assert done.exit_code == 0, done.output
    table = read_catalog(out)
    assert table.meta["PSFFROM"] == "run" and len(table) == 3
    r68 = invoke("run", maps, "--out", tmp_path / "r.fits", "--psf", "r68=0.2273deg", "-q")
    assert r68.exit_code == 0, r68.output
    bare = invoke("run", maps, "--out", tmp_path / "b.fits", "--psf", "0.15")
    assert bare.exit_code != 0 and "give an angle" in bare.output


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
    assert [c for c in read_catalog(out).colnames if c != "sky_centroid"] == list(CATALOG_COLUMNS)
