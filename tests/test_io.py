"""FITS storage: reading input maps (and refusing bad ones), the state round trip, atomic writes."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from helpers import random_arrays

import cwtflow
from cwtflow import InputError, StoreError
from cwtflow.io import atomic_output, check_output, read_maps, write_maps
from cwtflow.maps import default_wcs
from cwtflow.provenance import provenance
from cwtflow.state import STATE_VARS
from cwtflow.state_files import read_state, write_state

SHAPE = (20, 30)


def maps_hdus(shape: tuple[int, int] = SHAPE, *, exposure: bool = True) -> fits.HDUList:
    """A valid maps file in memory: COUNTS (primary, int32), BACKGROUND, EXPOSURE."""
    rng = np.random.default_rng(5)
    header = default_wcs(shape).to_header()
    background = rng.uniform(0.5, 2.0, shape)
    primary = fits.PrimaryHDU(rng.poisson(background).astype(np.int32), header=header)
    primary.header["EXTNAME"] = "COUNTS"
    hdus = [primary, fits.ImageHDU(background, header=header, name="BACKGROUND")]
    if exposure:
        hdus.append(fits.ImageHDU(np.full(shape, 3e10, np.float32), header=header, name="EXPOSURE"))
    return fits.HDUList(hdus)


def save(hdul: fits.HDUList, path: Path) -> Path:
    hdul.writeto(path)
    return path


def _set(hdul: fits.HDUList, name: str, values: np.ndarray) -> fits.HDUList:
    hdul[name].data = values
    return hdul


def _nan_counts(h: fits.HDUList) -> fits.HDUList:
    data = h["COUNTS"].data.astype(np.float64)
    data[3, 4] = np.nan
    return _set(h, "COUNTS", data)


def _nan_background(h: fits.HDUList) -> fits.HDUList:
    data = h["BACKGROUND"].data.copy()
    data[0, 0] = np.inf
    return _set(h, "BACKGROUND", data)


def _negative_background(h: fits.HDUList) -> fits.HDUList:
    data = h["BACKGROUND"].data.copy()
    data[2, 2] = -0.5
    return _set(h, "BACKGROUND", data)


def _shape_mismatch(h: fits.HDUList) -> fits.HDUList:
    return _set(h, "BACKGROUND", h["BACKGROUND"].data[:, :-1].copy())


def _wcs_mismatch(h: fits.HDUList) -> fits.HDUList:
    h["BACKGROUND"].header["CRVAL1"] = 10.0
    return h


def _non_celestial(h: fits.HDUList) -> fits.HDUList:
    for hdu in h:
        hdu.header["CTYPE1"], hdu.header["CTYPE2"] = "X", "Y"
    return h


def _empty(h: fits.HDUList) -> fits.HDUList:
    primary = fits.PrimaryHDU()
    primary.header.update(default_wcs(SHAPE).to_header())
    primary.header["EXTNAME"] = "COUNTS"
    h[0] = primary
    return h


def _zero_size(h: fits.HDUList) -> fits.HDUList:
    return _set(h, "COUNTS", np.zeros((0, SHAPE[1]), np.int32))


def _swapped_axes(h: fits.HDUList) -> fits.HDUList:
    for hdu in h:
        hdu.header["CTYPE1"], hdu.header["CTYPE2"] = "GLAT-CAR", "GLON-CAR"
    return h


def _cube(h: fits.HDUList) -> fits.HDUList:
    return _set(h, "BACKGROUND", np.ones((2, *SHAPE)))


def _table(h: fits.HDUList) -> fits.HDUList:
    table = fits.BinTableHDU.from_columns([fits.Column("A", "D", array=np.zeros(3))])
    table.name = "BACKGROUND"
    h[1] = table
    return h


def _no_background(h: fits.HDUList) -> fits.HDUList:
    del h["BACKGROUND"]
    return h


#: name -> (mutation of a valid file, words the error message must contain)
BAD_MAPS: dict[str, tuple[Callable[[fits.HDUList], fits.HDUList], tuple[str, ...]]] = {
    "missing HDU": (_no_background, ("'BACKGROUND' not found", "COUNTS, EXPOSURE")),
    "NaN counts": (_nan_counts, ("counts", "1 NaN or infinite")),
    "inf background": (_nan_background, ("background", "NaN or infinite")),
    "negative background": (_negative_background, ("background", "1 negative pixels")),
    "shape mismatch": (_shape_mismatch, ("shapes differ", "(20, 29)", "(20, 30)")),
    "WCS mismatch": (_wcs_mismatch, ("WCS of background", "differs", "CRVAL1")),
    "non-celestial WCS": (_non_celestial, ("no 2-D celestial WCS", "'X'")),
    "empty map": (_empty, ("empty map", "COUNTS")),
    "zero-size map": (_zero_size, ("empty map",)),
    "swapped axes": (_swapped_axes, ("longitude must be the first",)),
    "cube": (_cube, ("not a 2-D image", "(2, 20, 30)")),
    "table": (_table, ("BinTableHDU", "not an image")),
}


# --------------------------------------------------------------------------------------------
# read_maps


def test_read_maps_default_layout(tmp_path):
    hdul = maps_hdus()
    path = save(hdul, tmp_path / "maps.fits")
    data = read_maps(path)
    assert list(data.data_vars) == ["counts", "background", "exposure"]
    assert data["counts"].dtype == np.float64
    np.testing.assert_array_equal(data["counts"].values, hdul["COUNTS"].data)
    np.testing.assert_array_equal(data["background"].values, hdul["BACKGROUND"].data)
    np.testing.assert_array_equal(data["exposure"].values, hdul["EXPOSURE"].data)
    assert data.attrs["wcs"]["CTYPE1"] == "GLON-CAR"
    assert data.sizes == {"y": SHAPE[0], "x": SHAPE[1]}
    assert data["lon"].shape == (SHAPE[1],) and data["lat"].shape == (SHAPE[0],)


def test_read_maps_exposure_is_optional(tmp_path):
    path = save(maps_hdus(exposure=False), tmp_path / "maps.fits.gz")
    data = read_maps(path)
    assert "exposure" not in data
    with pytest.raises(InputError, match="'EXPOSURE' not found"):
        read_maps(path, exposure_hdu="EXPOSURE")


def test_read_maps_hdu_names_and_indices(tmp_path):
    hdul = maps_hdus()
    hdul[0].header["EXTNAME"] = "OBS"
    hdul[1].name = "BKG"
    path = save(hdul, tmp_path / "maps.fits")
    by_name = read_maps(path, counts_hdu="obs", background_hdu="bkg", exposure_hdu="EXPOSURE")
    by_index = read_maps(path, counts_hdu=0, background_hdu=1, exposure_hdu=2)
    xr.testing.assert_identical(by_name, by_index)


def test_write_maps_read_maps_round_trip(tmp_path, random_maps):
    data = random_maps(2, shape=(24, 32))
    data["exposure"] = xr.full_like(data["counts"], 2.5e10).assign_attrs(
        units="cm2 s", long_name="exposure"
    )
    path = write_maps(data, tmp_path / "maps.fits")
    assert fits.getheader(path, 0)["BITPIX"] == 32  # integer counts stored as int32
    xr.testing.assert_identical(read_maps(path), data)
    with pytest.raises(StoreError, match="output file exists"):
        write_maps(data, path)


@pytest.mark.parametrize("case", sorted(BAD_MAPS))
def test_read_maps_refuses_bad_input(tmp_path, case):
    mutate, words = BAD_MAPS[case]
    path = save(mutate(maps_hdus()), tmp_path / "bad.fits")
    with pytest.raises(InputError) as info:
        read_maps(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (case, message)


def test_read_maps_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_maps(tmp_path / "nope.fits")
    with pytest.raises(InputError, match="not a file"):
        read_maps(tmp_path)
    junk = tmp_path / "junk.fits"
    junk.write_text("not a FITS file\n")
    with pytest.raises(InputError, match=r"cannot read .* as FITS"):
        read_maps(junk)


def test_read_maps_survey(shared_data):
    data = read_maps(shared_data / "fermi_survey_gal_plane.fits.gz")
    assert data.sizes == {"y": 101, "x": 2001}
    assert set(data.data_vars) == {"counts", "background", "exposure"}
    assert data.attrs["wcs"]["CTYPE1"] == "GLON-CAR"
    assert float(data["exposure"].min()) > 0
    cut = cwtflow.cutout(data, cwtflow.map_center(data), (20, 10) * u.deg)
    assert cut.sizes == {"y": 100, "x": 200}
    assert float(cut["counts"].sum()) == 8889


# --------------------------------------------------------------------------------------------
# State round trip


@pytest.fixture(scope="module")
def state() -> xr.Dataset:
    counts, background = random_arrays(7, (30, 44))
    data = cwtflow.make_maps(counts, background)
    cwt = cwtflow.CWT(cwtflow.CWTKernels(2, 1.5, 1.4), max_iter=4, tol=0.0)
    return cwt.analyze(data)


def _assert_same_state(back: xr.Dataset, state: xr.Dataset) -> None:
    xr.testing.assert_identical(back, state)
    for name in (*state.data_vars, *state.coords):
        assert back[name].dtype == state[name].dtype, name
        np.testing.assert_array_equal(back[name].values, state[name].values)
    assert back.attrs == state.attrs


@pytest.mark.parametrize("name", ["state.fits", "state.fits.gz"])
def test_state_round_trip_is_exact(tmp_path, state, name):
    path = write_state(state, tmp_path / name)
    back = read_state(path)
    _assert_same_state(back, state)
    assert list(back.data_vars) == list(STATE_VARS)
    assert back["support"].dtype == bool
    assert back.attrs["iterations"] == 4
    assert len(back.attrs["residual_variance"]) == 4


def test_lazy_state_writes_the_same_file(tmp_path, state):
    lazy = state.chunk({"y": 16, "x": 20})
    back = read_state(write_state(lazy, tmp_path / "lazy.fits"))
    _assert_same_state(back, state)
    record = provenance()
    eager = write_state(state, tmp_path / "eager.fits", provenance_record=record)
    write_state(lazy, tmp_path / "lazy.fits", provenance_record=record, overwrite=True)
    # same cards and pixels (the bytes differ: gzip tiles record the time of writing)
    with fits.open(eager) as a, fits.open(tmp_path / "lazy.fits") as b:
        assert [h.name for h in a] == [h.name for h in b]
        for ha, hb in zip(a, b, strict=True):
            assert ha.header == hb.header
            np.testing.assert_array_equal(ha.data, hb.data)


def test_state_round_trip_keeps_unrounded_coordinates(tmp_path, random_maps):
    """A TAN grid with a 1/360 deg pixel: the WCS cards round it, the coordinates are kept."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-1 / 360, 1 / 360]
    wcs.wcs.crval = [83.63308333333333, 22.0145]
    wcs.wcs.crpix = [12.5, 10.5]
    data = random_maps(3, shape=(20, 24))
    data = cwtflow.make_maps(data["counts"].values, data["background"].values, wcs)
    state = cwtflow.CWT(cwtflow.CWTKernels(1, 1.5, 1.5), max_iter=2).analyze(data)
    _assert_same_state(read_state(write_state(state, tmp_path / "tan.fits")), state)


def test_state_file_layout(tmp_path, state):
    path = write_state(state, tmp_path / "state.fits")
    with fits.open(path) as hdul:
        names = [hdu.name for hdu in hdul]
        # stored: what cannot be rebuilt; transform_2d (= sum_i S_i T_i) and lon/lat are
        # rebuilt by read_state, derived images by cwtflow.images
        stored = [n.upper() for n in STATE_VARS if n != "transform_2d"]
        assert names == ["PRIMARY", *stored, "SCALES"]
        assert json.loads(hdul[0].header["CWTREBLT"]).keys() == {"transform_2d", "lon", "lat"}
        assert hdul["COUNTS"].data.dtype == np.int32
        assert all(isinstance(hdu, fits.CompImageHDU) for hdu in hdul[1:-1])
        primary = hdul[0].header
        assert primary["ITERS"] == 4
        assert primary["CONVERGD"] is False
        assert primary["NSCALE"] == 2 and primary["MINSCALE"] == 1.5
        assert [primary[f"RESVAR{i}"] for i in range(1, 5)] == pytest.approx(
            state.attrs["residual_variance"], rel=1e-15
        )
        np.testing.assert_array_equal(hdul["SCALES"].data["SCALE"], state["scale"].values)
        assert hdul["SUPPORT"].data.dtype == np.uint8
        assert hdul["SUPPORT"].data.shape == state["support"].shape
        reference = cwtflow.wcs_from_attrs(state.attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            for hdu in hdul[1:]:
                if hdu.name == "SCALES" or hdu.header["NAXIS"] == 1:
                    continue  # the table, and the 1-D coordinates LON (on x) and LAT (on y)
                assert WCS(hdu.header).celestial.wcs.compare(reference.wcs), hdu.name
        assert hdul["COUNTS"].header["BUNIT"] == "count"
    # a state file is also a maps file
    maps = read_maps(path)
    np.testing.assert_array_equal(maps["counts"].values, state["counts"].values)


def test_write_state_refuses_overwrite_and_leaves_no_temporary(tmp_path, state):
    path = write_state(state, tmp_path / "state.fits")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="output file exists"):
        write_state(state, path)
    assert path.read_bytes() == before
    changed = state.copy()
    changed.attrs = {**state.attrs, "iterations": 99}
    write_state(changed, path, overwrite=True)
    assert read_state(path).attrs["iterations"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.fits"]


def test_write_state_refuses_non_states(tmp_path, state, random_maps):
    with pytest.raises(InputError, match="not a CWT state: missing model"):
        write_state(random_maps(1), tmp_path / "x.fits")
    bad = state.copy()
    bad.attrs = {**state.attrs, "opaque": object()}
    with pytest.raises(InputError, match="state attrs cannot be stored as JSON"):
        write_state(bad, tmp_path / "x.fits")
    assert list(tmp_path.iterdir()) == []


def test_read_state_refuses_other_files(tmp_path, state):
    with pytest.raises(StoreError, match="file not found"):
        read_state(tmp_path / "nope.fits")
    maps = save(maps_hdus(), tmp_path / "maps.fits")
    with pytest.raises(StoreError, match="not a cwtflow state file"):
        read_state(maps)
    path = write_state(state, tmp_path / "state.fits")
    with fits.open(path) as hdul:
        del hdul["ERROR"]
        hdul.writeto(tmp_path / "partial.fits")
    with pytest.raises(StoreError, match=r"no HDU for \['error'\]"):
        read_state(tmp_path / "partial.fits")


# --------------------------------------------------------------------------------------------
# Output paths


def test_check_output(tmp_path):
    assert check_output(tmp_path / "a.fits") == tmp_path / "a.fits"
    with pytest.raises(StoreError, match="output folder does not exist"):
        check_output(tmp_path / "missing" / "a.fits")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="output folder is not a folder"):
        check_output(tmp_path / "file" / "a.fits")
    with pytest.raises(StoreError, match="output path is a folder"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(StoreError, match=r"use --overwrite"):
        check_output(tmp_path / "file", hint="--overwrite")


def test_atomic_output_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out.fits.gz"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".fits.gz")
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert list(tmp_path.iterdir()) == [target]
