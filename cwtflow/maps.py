"""Input sky maps as labelled xarray Datasets: construction, WCS in attrs, coordinates, checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from .errors import InputError

__all__ = [
    "cutout",
    "is_allsky",
    "make_maps",
    "map_center",
    "sky_coordinates",
    "validate_maps",
    "wcs_from_attrs",
    "wcs_to_attrs",
]

WCS_ATTR = "wcs"


def wcs_to_attrs(wcs: WCS) -> dict[str, Any]:
    """The WCS as a JSON-ready dict of FITS header cards (no COMMENT/HISTORY)."""
    header = wcs.to_header()
    return {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}


def wcs_from_attrs(attrs: Mapping[str, Any]) -> WCS:
    """Rebuild the celestial WCS stored by `wcs_to_attrs` in ``attrs["wcs"]``."""
    try:
        cards = attrs[WCS_ATTR]
    except KeyError:
        raise InputError("dataset has no WCS: attrs['wcs'] is missing") from None
    return WCS(fits.Header(dict(cards)))


def _check_celestial(wcs: WCS) -> WCS:
    if wcs.naxis != 2 or not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise InputError(f"WCS is not a 2-D celestial WCS (CTYPE {list(wcs.wcs.ctype)})")
    return wcs


def sky_coordinates(wcs: WCS, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (deg) of every pixel centre, each of ``shape`` (y, x)."""
    y, x = np.indices(shape, dtype=np.float64)
    lon, lat = wcs.celestial.wcs_pix2world(x, y, 0)
    return lon, lat


def _frame_name(wcs: WCS) -> str:
    ctype = wcs.wcs.ctype[0].upper()
    if ctype.startswith("GLON"):
        return "galactic"
    if ctype.startswith("ELON"):
        return "ecliptic"
    return str(wcs.wcs.radesys or "icrs").lower()


def _coords(wcs: WCS, shape: tuple[int, int]) -> dict[str, xr.Variable]:
    lon, lat = sky_coordinates(wcs, shape)
    frame = _frame_name(wcs)
    return {
        "lon": xr.Variable(
            ("y", "x"), lon, {"units": "deg", "frame": frame, "long_name": "pixel centre longitude"}
        ),
        "lat": xr.Variable(
            ("y", "x"), lat, {"units": "deg", "frame": frame, "long_name": "pixel centre latitude"}
        ),
    }


def is_allsky(wcs: WCS, shape: tuple[int, int]) -> bool:
    """Whether the x axis covers exactly 360 deg of longitude on a CAR grid (wraps)."""
    ctype = wcs.wcs.ctype[0].upper()
    if not ctype.endswith("-CAR") or wcs.wcs.has_cd() or not wcs.wcs.get_pc()[0, 1] == 0:
        return False
    span = abs(wcs.wcs.cdelt[0]) * shape[1]
    return bool(np.isclose(span, 360.0, rtol=0, atol=1e-9 * 360))


def make_maps(
    counts: np.ndarray,
    background: np.ndarray,
    wcs: WCS | None = None,
    *,
    exposure: np.ndarray | None = None,
) -> xr.Dataset:
    """Input Dataset for `CWT.analyze` from plain arrays.

    Parameters
    ----------
    counts, background : array-like, shape (ny, nx)
        Observed counts and predicted background counts on one pixel grid.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the grid. Without it, a 0.1 deg CAR Galactic grid centred on (0, 0) is
        assumed (useful for simulations).
    exposure : array-like, shape (ny, nx), optional
        Exposure (cm2 s), carried along for flux estimates.
    """
    counts = np.asarray(counts, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    if counts.ndim != 2:
        raise InputError(f"counts must be a 2-D image, got {counts.ndim} dimensions")
    if wcs is None:
        wcs = default_wcs(counts.shape)
    data_vars = {
        "counts": (("y", "x"), counts, {"units": "count", "long_name": "observed counts"}),
        "background": (
            ("y", "x"),
            background,
            {"units": "count", "long_name": "predicted background counts"},
        ),
    }
    if exposure is not None:
        data_vars["exposure"] = (
            ("y", "x"),
            np.asarray(exposure, dtype=np.float64),
            {"units": "cm2 s", "long_name": "exposure"},
        )
    _check_celestial(wcs)
    if background.shape != counts.shape:
        raise InputError(
            f"counts and background shapes differ: {counts.shape} vs {background.shape}"
        )
    ds = xr.Dataset(data_vars, coords=_coords(wcs, counts.shape))
    ds.attrs[WCS_ATTR] = wcs_to_attrs(wcs)
    return ds


def default_wcs(shape: tuple[int, int], *, binsz: float = 0.1) -> WCS:
    """A Galactic CAR grid of ``binsz`` deg pixels centred on (l, b) = (0, 0)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.cdelt = [-binsz, binsz]
    wcs.wcs.crval = [0.0, 0.0]
    wcs.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    return wcs


def validate_maps(data: xr.Dataset) -> xr.Dataset:
    """Check an input Dataset and return it with float64 ``counts``/``background`` on (y, x).

    Raises `InputError` naming the problem: missing variable, wrong dims, shape mismatch, empty
    map, NaN/inf or negative pixels in counts, background or exposure (with their number),
    missing or non-celestial WCS. Lazy (dask-backed) inputs are checked with dask reductions,
    not loaded. The one check of pixel values: `cwtflow.read_maps` and `CWT.analyze` use it.
    """
    if not isinstance(data, xr.Dataset):
        raise InputError(f"expected an xarray.Dataset, got {type(data).__name__}")
    for name in ("counts", "background"):
        if name not in data:
            raise InputError(f"input has no '{name}' variable")
        if data[name].dims != ("y", "x"):
            raise InputError(f"'{name}' must have dims ('y', 'x'), got {data[name].dims}")
    if data.sizes["y"] == 0 or data.sizes["x"] == 0:
        raise InputError(f"empty map: shape {(data.sizes['y'], data.sizes['x'])}")
    _check_celestial(wcs_from_attrs(data.attrs))
    out = data.copy()
    names = [n for n in ("counts", "background", "exposure") if n in data]
    for name in names:
        if data[name].dims != ("y", "x"):
            raise InputError(f"'{name}' must have dims ('y', 'x'), got {data[name].dims}")
        out[name] = data[name].astype(np.float64)
    # one pass over the pixels, every count in one computation (dask reductions when lazy)
    stats = {}
    for name in names:
        var = out[name]
        stats[f"{name}_nonfinite"] = (~np.isfinite(var)).sum()
        stats[f"{name}_negative"] = (var < 0).sum()
        stats[f"{name}_min"] = var.min()
    values = {k: v.item() for k, v in xr.Dataset(stats).compute().data_vars.items()}
    for name in names:
        size = out[name].size
        if values[f"{name}_nonfinite"]:
            n = values[f"{name}_nonfinite"]
            raise InputError(
                f"{name} contains NaN or infinite pixels ({n} NaN or infinite of {size})"
            )
        if values[f"{name}_negative"]:
            n, low = values[f"{name}_negative"], values[f"{name}_min"]
            raise InputError(f"{name} contains negative pixels ({n} negative pixels, min {low:g})")
    return out


def map_center(data: xr.Dataset) -> SkyCoord:
    """Sky position of the central pixel ``((ny - 1) // 2, (nx - 1) // 2)`` (the tutorial's
    ``center_skydir``: (l, b) = (0.05, -0.05) deg on the survey map)."""
    wcs = wcs_from_attrs(data.attrs)
    return wcs.pixel_to_world((data.sizes["x"] - 1) // 2, (data.sizes["y"] - 1) // 2)


def cutout(data: xr.Dataset, position: SkyCoord, width: Any) -> xr.Dataset:
    """Cut a rectangle of angular ``width`` (lon, lat) centred on ``position`` out of ``data``.

    ``width`` is an astropy Quantity (one value or (lon, lat) pair); like the original tutorial,
    20 x 10 deg around the centre of the 0.1 deg survey map gives 200 x 100 pixels. Every
    (y, x) variable is cut; the WCS and sky coordinates follow.
    """
    wcs = wcs_from_attrs(data.attrs)
    shape = (data.sizes["y"], data.sizes["x"])
    size = _lat_lon_size(width)
    try:
        box = Cutout2D(np.zeros(shape, dtype=bool), position, size, wcs=wcs, mode="trim")
    except Exception as exc:  # astropy raises NoOverlapError / ValueError
        raise InputError(f"cutout at {position} of {width} does not fit the map: {exc}") from None
    (y0, y1), (x0, x1) = ((s.start, s.stop) for s in box.slices_original)
    out = data.isel(y=slice(y0, y1), x=slice(x0, x1)).drop_vars(["lon", "lat"], errors="ignore")
    new_wcs = wcs[y0:y1, x0:x1]
    out = out.assign_coords(_coords(new_wcs, (y1 - y0, x1 - x0)))
    out.attrs[WCS_ATTR] = wcs_to_attrs(new_wcs)
    return out


def _lat_lon_size(width: Any) -> Any:
    """Cutout2D wants (ny, nx) = (lat, lon) order; the tutorial gives (lon, lat). Widths must
    be angles: a bare number (which Cutout2D would read as pixels) is refused."""
    if not isinstance(width, u.Quantity) or not width.unit.is_equivalent(u.deg):
        raise InputError(
            f"width: give an angle, e.g. (20, 10) * u.deg (got {width!r}); the cut-out is "
            "measured on the sky, not in pixels"
        )
    if np.ndim(width) == 0:
        return width
    lon, lat = width
    return (lat, lon)
