"""Input maps: construction, validation, WCS in attrs, cutouts, all-sky detection."""

from __future__ import annotations

import json

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

import cwtflow
from cwtflow import InputError
from cwtflow.maps import (
    default_wcs,
    is_allsky,
    make_maps,
    map_center,
    sky_coordinates,
    validate_maps,
    wcs_from_attrs,
    wcs_to_attrs,
)


def _car(shape: tuple[int, int], binsz: float, *, lon0: float = 0.0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    wcs.wcs.cdelt = [-binsz, binsz]
    wcs.wcs.crval = [lon0, 0.0]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    return wcs


def _tan(shape: tuple[int, int]) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-0.05, 0.05]
    wcs.wcs.crval = [83.6, 22.0]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    return wcs


def test_make_maps():
    counts = np.arange(12, dtype=np.int32).reshape(3, 4)
    background = np.full((3, 4), 0.5, dtype=np.float32)
    exposure = np.full((3, 4), 1e10)
    data = make_maps(counts, background, _tan((3, 4)), exposure=exposure)
    assert data["counts"].dims == data["background"].dims == ("y", "x")
    assert data["counts"].dtype == data["background"].dtype == np.float64
    np.testing.assert_array_equal(data["counts"].values, counts)
    np.testing.assert_array_equal(data["exposure"].values, exposure)
    # a TAN grid is not separable: no coordinate arrays, the WCS in the attrs is the grid
    assert "lon" not in data.coords and "lat" not in data.coords
    json.dumps(data.attrs["wcs"])  # plain cards, storable anywhere
    data = make_maps(counts, background, _car((3, 4), 0.1, lon0=30.0))
    assert data["lon"].dims == ("x",) and data["lat"].dims == ("y",)
    assert data["lon"].attrs["units"] == "deg"
    lon, lat = _car((3, 4), 0.1, lon0=30.0).wcs_pix2world(3, 2, 0)
    assert data["lon"].values[3] == pytest.approx(float(lon), abs=1e-12)
    assert data["lat"].values[2] == pytest.approx(float(lat), abs=1e-12)
    json.dumps(data.attrs["wcs"])  # plain cards, storable anywhere


def test_make_maps_default_wcs_is_centred_galactic_car():
    data = make_maps(np.zeros((11, 21)), np.ones((11, 21)))
    wcs = wcs_from_attrs(data.attrs)
    assert list(wcs.wcs.ctype) == ["GLON-CAR", "GLAT-CAR"]
    assert data["lon"].values[10] == pytest.approx(0.0, abs=1e-12)
    assert data["lat"].values[5] == pytest.approx(0.0, abs=1e-12)
    assert abs(data["lat"].values[6] - data["lat"].values[5]) == pytest.approx(0.1)
    expected = default_wcs((11, 21))
    assert wcs_from_attrs({"wcs": wcs_to_attrs(expected)}).wcs.compare(wcs.wcs)


@pytest.mark.parametrize(
    "counts, background, wcs, match",
    [
        (np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), None, "2-D"),
        (np.zeros((3, 4)), np.zeros((4, 3)), None, "shape"),
        (np.zeros(5), np.zeros(5), None, "2-D"),
    ],
)
def test_make_maps_errors(counts, background, wcs, match):
    with pytest.raises(InputError, match=match):
        make_maps(counts, background, wcs)


def test_make_maps_rejects_non_celestial_wcs():
    linear = WCS(naxis=2)
    linear.wcs.ctype = ["LINEAR", "LINEAR"]
    with pytest.raises(InputError, match="celestial"):
        make_maps(np.zeros((3, 4)), np.zeros((3, 4)), linear)
    spectral = WCS(naxis=3)
    spectral.wcs.ctype = ["GLON-CAR", "GLAT-CAR", "ENERGY"]
    with pytest.raises(InputError, match="celestial"):
        make_maps(np.zeros((3, 4)), np.zeros((3, 4)), spectral)


def _good() -> xr.Dataset:
    return make_maps(np.ones((6, 7)), np.full((6, 7), 0.5))


def test_validate_maps_returns_float64_copy():
    data = _good()
    data["counts"] = data["counts"].astype(np.int32)
    out = validate_maps(data)
    assert out["counts"].dtype == np.float64
    assert data["counts"].dtype == np.int32  # input left alone
    xr.testing.assert_equal(out["background"], data["background"])


def test_validate_maps_lazy_input_stays_lazy():
    data = _good().chunk({"y": 3, "x": 4})
    out = validate_maps(data)
    assert out["counts"].chunks is not None
    bad = _good()
    bad["background"][5, 6] = -1.0
    with pytest.raises(InputError, match="background contains negative"):
        validate_maps(bad.chunk({"y": 3, "x": 4}))


def _set(name: str, value: float) -> xr.Dataset:
    data = _good()
    data[name][1, 2] = value
    return data


@pytest.mark.parametrize(
    "data, match",
    [
        (_set("counts", np.nan), "counts contains NaN"),
        (_set("background", np.inf), "background contains NaN or infinite"),
        (_set("background", -1e-9), "background contains negative"),
        (_set("counts", -1.0), "counts contains negative"),
        (_good().drop_vars("background"), "background"),
        (_good().drop_vars("counts"), "counts"),
        (_good().transpose(), "dims"),
        (_good().isel(x=slice(0, 0)), "empty"),
        (_good().assign_attrs(wcs={"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"}), "celestial"),
        (xr.Dataset({"counts": (("y", "x"), np.ones((2, 2)))}), "background"),
    ],
    ids=[
        "nan_counts",
        "inf_background",
        "negative_background",
        "negative_counts",
        "no_background",
        "no_counts",
        "transposed",
        "empty",
        "linear_wcs",
        "missing_background",
    ],
)
def test_validate_maps_errors(data, match):
    with pytest.raises(InputError, match=match):
        validate_maps(data)


def test_validate_maps_without_wcs():
    data = _good()
    data.attrs = {}
    with pytest.raises(InputError, match="WCS"):
        validate_maps(data)
    with pytest.raises(InputError):
        validate_maps(data["counts"])


@pytest.mark.parametrize(
    "make_wcs", [lambda: _car((10, 20), 0.1, lon0=30.0), lambda: _tan((10, 20))]
)
def test_wcs_round_trip_through_attrs(make_wcs):
    wcs = make_wcs()
    attrs = wcs_to_attrs(wcs)
    back = wcs_from_attrs(json.loads(json.dumps({"wcs": attrs})))
    assert wcs.wcs.compare(back.wcs)
    x, y = np.array([0.0, 7.5, 19.0]), np.array([0.0, 3.0, 9.0])
    np.testing.assert_allclose(back.wcs_pix2world(x, y, 0), wcs.wcs_pix2world(x, y, 0), atol=1e-12)


def test_sky_coordinates():
    wcs = _tan((4, 5))
    lon, lat = sky_coordinates(wcs, (4, 5))
    assert lon.shape == lat.shape == (4, 5)
    expected = wcs.pixel_to_world(4, 3)
    assert lon[3, 4] == pytest.approx(expected.ra.deg)
    assert lat[3, 4] == pytest.approx(expected.dec.deg)


def test_is_allsky():
    assert is_allsky(_car((18, 36), 10.0), (18, 36))
    assert is_allsky(_car((180, 3600), 0.1), (180, 3600))
    assert not is_allsky(_car((18, 35), 10.0), (18, 35))
    assert not is_allsky(_car((100, 2001), 0.1), (100, 2001))
    assert not is_allsky(_tan((18, 36)), (18, 36))


def test_cutout_synthetic():
    shape = (60, 80)
    counts = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    data = make_maps(counts, counts * 0.5, _car(shape, 0.1))
    position = SkyCoord(l=1.0 * u.deg, b=-0.5 * u.deg, frame="galactic")
    out = cwtflow.cutout(data, position, u.Quantity([2.0, 1.0], "deg"))
    assert out.sizes == {"y": 10, "x": 20}
    # the window is where the original pixels are: compare values and sky coordinates
    y0, x0 = np.argwhere(counts == out["counts"].values[0, 0])[0]
    np.testing.assert_array_equal(out["counts"].values, counts[y0 : y0 + 10, x0 : x0 + 20])
    np.testing.assert_array_equal(out["background"].values, 0.5 * out["counts"].values)
    np.testing.assert_allclose(out["lon"].values, data["lon"].values[x0 : x0 + 20])
    np.testing.assert_allclose(out["lat"].values, data["lat"].values[y0 : y0 + 10])
    centre = wcs_from_attrs(out.attrs).world_to_pixel(position)
    assert centre[0] == pytest.approx(9.5, abs=0.51) and centre[1] == pytest.approx(4.5, abs=0.51)
    # a square cutout from a scalar width
    assert cwtflow.cutout(data, position, 1.0 * u.deg).sizes == {"y": 10, "x": 10}


def test_cutout_at_the_edge_is_trimmed_and_outside_raises():
    data = make_maps(np.ones((60, 80)), np.ones((60, 80)), _car((60, 80), 0.1))
    corner = wcs_from_attrs(data.attrs).pixel_to_world(0, 0)
    out = cwtflow.cutout(data, corner, u.Quantity([2.0, 2.0], "deg"))
    assert 0 < out.sizes["y"] < 20 and 0 < out.sizes["x"] < 20
    far = SkyCoord(l=120.0 * u.deg, b=40.0 * u.deg, frame="galactic")
    with pytest.raises(InputError, match="cutout"):
        cwtflow.cutout(data, far, u.Quantity([2.0, 2.0], "deg"))


def test_survey_map_center_and_tutorial_cutout(survey_maps, survey_cutout):
    assert survey_maps.sizes == {"y": 101, "x": 2001}
    assert not is_allsky(wcs_from_attrs(survey_maps.attrs), (101, 2001))
    centre = map_center(survey_maps)
    assert centre.l.wrap_at(180 * u.deg).deg == pytest.approx(0.05, abs=1e-9)
    assert centre.b.deg == pytest.approx(-0.05, abs=1e-9)
    assert survey_cutout.sizes == {"y": 100, "x": 200}
    assert float(survey_cutout["counts"].sum()) == 8889
    np.testing.assert_array_equal(
        survey_cutout["counts"].values, survey_maps["counts"].values[0:100, 900:1100]
    )
    np.testing.assert_array_equal(
        survey_cutout["background"].values, survey_maps["background"].values[0:100, 900:1100]
    )
    assert survey_cutout["lon"].values[0] == pytest.approx(10.05, abs=1e-9)
    assert survey_cutout["lat"].values[0] == pytest.approx(-5.05, abs=1e-9)
    # continuous across l = 0: from +10 deg on the left to -10 deg on the right
    assert survey_cutout["lon"].values[-1] == pytest.approx(-9.85, abs=1e-9)
    assert np.all(np.diff(survey_maps["lon"].values) < 0)


# --------------------------------------------------------------------------------------------
# Coordinates: 1-D where separable, continuous in longitude, lazy 2-D on demand


def test_galactic_centre_map_has_continuous_1d_coordinates():
    shape = (50, 400)  # 40 x 5 deg around l = 0
    data = make_maps(np.ones(shape), np.ones(shape), _car(shape, 0.1))
    lon, lat = data["lon"].values, data["lat"].values
    assert lon.shape == (400,) and lat.shape == (50,)
    # x runs towards negative longitude without a jump at l = 0 (no 0 -> 360 wrap)
    np.testing.assert_allclose(np.diff(lon), -0.1, atol=1e-9)
    assert lon[0] == pytest.approx(19.95) and lon[-1] == pytest.approx(-19.95)
    np.testing.assert_allclose(np.diff(lat), 0.1, atol=1e-9)
    # selection by coordinate works on the 1-D axes
    assert data.sel(lon=0.05, method="nearest")["lon"].item() == pytest.approx(0.05)


@pytest.mark.parametrize("lon0", [0.0, 180.0, 359.0])
def test_allsky_longitudes_stay_within_180_deg_of_the_centre(lon0):
    wcs = _car((18, 36), 10.0, lon0=lon0)
    lon, _ = cwtflow.maps.separable_axes(wcs, (18, 36))
    assert np.all(np.diff(lon) < 0)
    assert lon.max() - lon.min() == pytest.approx(350.0)
    centre = float(wcs.wcs_pix2world(17.5, 8.5, 0)[0])
    assert np.all((lon > centre - 180 - 1e-9) & (lon <= centre + 180 + 1e-9))


def test_rotated_and_oblique_grids_get_no_coordinates():
    rotated = _car((10, 20), 0.1)
    rotated.wcs.pc = [[0.8, -0.6], [0.6, 0.8]]
    oblique = _car((10, 20), 0.1)
    oblique.wcs.crval = [30.0, 40.0]  # CAR around a point off the equator: lon depends on y
    for wcs in (rotated, oblique, _tan((10, 20))):
        assert cwtflow.maps.separable_axes(wcs, (10, 20)) is None
        data = make_maps(np.ones((10, 20)), np.ones((10, 20)), wcs)
        assert "lon" not in data.coords


def test_lazy_sky_coordinates_match_the_wcs():
    wcs = _tan((30, 40))
    lon, lat = sky_coordinates(wcs, (30, 40), chunks=(16, 16))
    assert lon.chunks == ((16, 14), (16, 16, 8))
    eager = sky_coordinates(wcs, (30, 40))
    np.testing.assert_array_equal(lon.compute(), eager[0])
    np.testing.assert_array_equal(lat.compute(), eager[1])
    world = wcs.pixel_to_world(39, 29)
    assert float(lon[29, 39]) == pytest.approx(world.ra.deg)


def test_pixel_checks_are_lazy_until_computed():
    import dask

    data = _good()
    data["background"].values[0, 0] = -1.0
    data = data.chunk({"y": 5, "x": 5})
    out = cwtflow.maps.validate_layout(data)
    checks = cwtflow.maps.pixel_checks(out)
    assert all(hasattr(v, "dask") for v in checks.values())
    (values,) = dask.compute(checks)
    with pytest.raises(InputError, match="background contains negative pixels"):
        cwtflow.maps.raise_pixel_errors(out, values)
