"""Input sky maps as labelled xarray Datasets: construction, WCS in attrs, coordinates, checks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import astropy.units as u
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS, FITSFixedWarning

from .errors import InputError, ParameterError

__all__ = [
    "MAX_PIXEL_VALUE",
    "cutout",
    "is_allsky",
    "make_maps",
    "map_center",
    "separable_axes",
    "sky_coordinates",
    "unwrap_lon",
    "validate_layout",
    "validate_maps",
    "wcs_from_attrs",
    "wcs_to_attrs",
]

WCS_ATTR = "wcs"

#: Largest pixel value accepted in counts, background and exposure. The run squares pixel
#: values (residual variance: a sum of squares over the map) and weights them by kernel
#: values (at most ~10 for the smallest kernels allowed, ~100 squared): ``v**2 * N * 100``
#: stays below float64's 1.8e308 for maps of N up to 1e12 pixels when
#: ``v <= sqrt(1.8e308 / 1e14) ~ 1e147``; 1e140 keeps a margin and is ~130 orders of
#: magnitude above any real count or exposure. Above it the state overflows to inf.
MAX_PIXEL_VALUE = 1e140


def wcs_to_attrs(wcs: WCS) -> dict[str, Any]:
    """The WCS as a JSON-ready dict of FITS header cards (no COMMENT/HISTORY)."""
    header = wcs.to_header()
    return {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}


def wcs_from_attrs(attrs: Mapping[str, Any]) -> WCS:
    """Rebuild the celestial WCS stored by `wcs_to_attrs` in ``attrs["wcs"]``."""
    if not isinstance(attrs, Mapping):
        raise InputError(f"attrs must be a mapping, got {type(attrs).__name__}")
    try:
        cards = attrs[WCS_ATTR]
    except KeyError:
        raise InputError("dataset has no WCS: attrs['wcs'] is missing") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(fits.Header(dict(cards)))
    except Exception as exc:  # astropy raises ValueError, KeyError, TypeError, MemoryError...
        raise InputError(f"attrs['wcs'] is not a usable WCS header: {exc}") from None


def _check_celestial(wcs: WCS) -> WCS:
    if wcs.naxis != 2 or not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise InputError(f"WCS is not a 2-D celestial WCS (CTYPE {list(wcs.wcs.ctype)})")
    return wcs


def sky_coordinates(wcs: WCS, shape: tuple[int, int], *, chunks: Any = None) -> tuple[Any, Any]:
    """Longitude and latitude (deg) of every pixel centre, each of ``shape`` (y, x).

    Longitudes are continuous across the map: they lie in (c - 180, c + 180] where c is the
    longitude of the map centre (a map centred on l = 0 runs from +lon to -lon, not from 0 to
    360). With ``chunks`` (as `dask.array` takes them) the arrays are dask arrays computed
    block by block from the WCS, so that nothing of the map's size is built in the driver.
    """
    cel = wcs.celestial
    centre = _centre_lon(cel, shape)
    if chunks is None:
        return _block_coordinates(cel, centre, (slice(0, shape[0]), slice(0, shape[1])))
    import dask.array as da

    template = da.empty(shape, chunks=chunks, dtype=np.float64)

    def block(part: np.ndarray, index: int, block_info: Any = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _block_coordinates(cel, centre, (slice(y0, y1), slice(x0, x1)))[index]

    return tuple(
        template.map_blocks(block, index, dtype=np.float64, meta=np.empty((0, 0)))
        for index in (0, 1)
    )


def _block_coordinates(
    cel: WCS, centre: float, region: tuple[slice, slice]
) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[region[0], region[1]].astype(np.float64)
    lon, lat = cel.wcs_pix2world(x, y, 0)
    return unwrap_lon(lon, centre), lat


def unwrap_lon(lon: Any, centre: float) -> Any:
    """Longitudes (deg) moved by multiples of 360 into (centre - 180, centre + 180]."""
    return centre + 180.0 - np.mod(centre - np.asarray(lon, dtype=np.float64) + 180.0, 360.0)


def _centre_lon(cel: WCS, shape: tuple[int, int]) -> float:
    lon, _ = cel.wcs_pix2world((shape[1] - 1) / 2, (shape[0] - 1) / 2, 0)
    return float(lon) if np.isfinite(lon) else 0.0


#: Cylindrical projections: without rotation, longitude depends on x only, latitude on y only.
_CYLINDRICAL = ("CAR", "CEA", "CYP", "MER")
#: Largest departure (deg) from a separable grid at the sampled pixels.
_SEPARABLE_ATOL = 1e-9


def separable_axes(wcs: WCS, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """1-D longitude (per column x) and latitude (per row y), deg, when the grid is separable.

    A grid is separable when longitude depends on x only and latitude on y only: a cylindrical
    projection (CAR, CEA, CYP, MER) with a diagonal PC/CD matrix and its native equator on the
    celestial one; this is verified on a sparse grid of pixels (edges included), so oblique
    cylindrical maps are recognised as not separable. ``None`` otherwise. Longitudes are
    continuous across the map (see `sky_coordinates`).
    """
    cel = wcs.celestial
    if cel.wcs.ctype[0].upper()[-3:] not in _CYLINDRICAL:
        return None
    matrix = cel.wcs.cd if cel.wcs.has_cd() else cel.wcs.get_pc()
    if matrix[0, 1] != 0 or matrix[1, 0] != 0:
        return None
    ny, nx = shape
    yref, xref = (ny - 1) // 2, (nx - 1) // 2
    lon, _ = cel.wcs_pix2world(np.arange(nx, dtype=np.float64), np.full(nx, float(yref)), 0)
    _, lat = cel.wcs_pix2world(np.full(ny, float(xref)), np.arange(ny, dtype=np.float64), 0)
    if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
        return None
    xs = np.unique(np.linspace(0, nx - 1, 17).round().astype(int))
    ys = np.unique(np.linspace(0, ny - 1, 17).round().astype(int))
    gx, gy = np.meshgrid(xs, ys)
    glon, glat = cel.wcs_pix2world(gx.astype(np.float64), gy.astype(np.float64), 0)
    dlon = np.abs(np.mod(glon - lon[gx] + 180.0, 360.0) - 180.0)
    polar = np.abs(glat) > 90.0 - 1e-9  # longitude is undefined at a pole
    if not (
        np.allclose(glat, lat[gy], rtol=0, atol=_SEPARABLE_ATOL)
        and np.all((dlon <= _SEPARABLE_ATOL) | polar)
    ):
        return None
    return unwrap_lon(lon, _centre_lon(cel, shape)), lat


def _frame_name(wcs: WCS) -> str:
    ctype = wcs.wcs.ctype[0].upper()
    if ctype.startswith("GLON"):
        return "galactic"
    if ctype.startswith("ELON"):
        return "ecliptic"
    return str(wcs.wcs.radesys or "icrs").lower()


def grid_coords(wcs: WCS, shape: tuple[int, int]) -> dict[str, xr.Variable]:
    """1-D ``lon`` (on x) and ``lat`` (on y) for a separable grid, else none (the WCS in the
    attrs is the coordinate system; `sky_coordinates` computes 2-D ones on demand)."""
    axes = separable_axes(wcs, shape)
    if axes is None:
        return {}
    frame = _frame_name(wcs)
    lon, lat = axes
    return {
        "lon": xr.Variable(
            ("x",), lon, {"units": "deg", "frame": frame, "long_name": "pixel centre longitude"}
        ),
        "lat": xr.Variable(
            ("y",), lat, {"units": "deg", "frame": frame, "long_name": "pixel centre latitude"}
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

    Raises
    ------
    InputError
        An array that is not a non-empty 2-D array of real numbers (complex, strings, 0 x 0),
        shapes that differ, or a WCS that is not 2-D celestial. Pixel values are checked by
        `validate_maps` (which `CWT.analyze` runs).
    ParameterError
        ``wcs`` is not an astropy WCS.

    Dask arrays stay lazy (converted to float64 block by block). Sky coordinates cost no
    map-sized array: 1-D ``lon`` on x and ``lat`` on y for a separable (unrotated cylindrical)
    grid, none otherwise (`separable_axes`, `sky_coordinates`).
    """
    counts = _image("counts", counts)
    background = _image("background", background)
    if exposure is not None:
        exposure = _image("exposure", exposure)
        if exposure.shape != counts.shape:
            raise InputError(
                f"counts and exposure shapes differ: {counts.shape} vs {exposure.shape}"
            )
    if wcs is not None and not isinstance(wcs, WCS):
        raise ParameterError(f"wcs must be an astropy.wcs.WCS or None, got {type(wcs).__name__}")
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
            exposure,
            {"units": "cm2 s", "long_name": "exposure"},
        )
    _check_celestial(wcs)
    if background.shape != counts.shape:
        raise InputError(
            f"counts and background shapes differ: {counts.shape} vs {background.shape}"
        )
    ds = xr.Dataset(data_vars, coords=grid_coords(wcs, counts.shape))
    ds.attrs[WCS_ATTR] = wcs_to_attrs(wcs)
    return ds


def _image(name: str, values: Any) -> np.ndarray:
    """``values`` as a non-empty 2-D float64 array (a dask array converted lazily), or an
    `InputError` naming ``name``."""
    array = values if isinstance(values, np.ndarray) or hasattr(values, "dask") else None
    if array is None:
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} is not an array of numbers: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"{name} must be an array of real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D image, got {array.ndim} dimensions")
    if array.size == 0:
        raise InputError(f"empty map: {name} has shape {array.shape}")
    if hasattr(array, "dask"):
        return array.astype(np.float64)
    return np.asarray(array, dtype=np.float64)


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
    map, NaN/inf, negative or overflowing (above `MAX_PIXEL_VALUE`, 1e140) pixels in counts,
    background or exposure (with their number), non-real dtypes, missing or non-celestial WCS.
    Lazy (dask-backed) inputs are checked with dask reductions, not loaded. The one check of
    pixel values: `cwtflow.read_maps` and `CWT.analyze` use it (`CWT.analyze` computes
    `pixel_checks` of a lazy input with its first pass over the data instead, see
    `validate_layout`).
    """
    out = validate_layout(data)
    checks = pixel_checks(out)
    if any(hasattr(v, "dask") for v in checks.values()):
        import dask

        (checks,) = dask.compute(checks)
    raise_pixel_errors(out, checks)
    return out


def validate_layout(data: xr.Dataset) -> xr.Dataset:
    """`validate_maps` without the pass over the pixel values (variables, dims, sizes, WCS;
    the maps converted to float64, lazily for dask arrays)."""
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
    for name in _MAP_NAMES:
        if name not in data:
            continue
        if data[name].dims != ("y", "x"):
            raise InputError(f"'{name}' must have dims ('y', 'x'), got {data[name].dims}")
        if data[name].dtype.kind not in "biuf":
            raise InputError(f"{name} must hold real numbers, got dtype {data[name].dtype}")
        if data[name].dtype != np.float64:
            out[name] = data[name].astype(np.float64)
    return out


_MAP_NAMES = ("counts", "background", "exposure")


def pixel_checks(data: xr.Dataset) -> dict[str, Any]:
    """The reductions behind the pixel checks of `validate_maps`, not computed: for each map,
    the number of NaN/infinite pixels, of negative pixels, and the minimum. Dask scalars for a
    lazy ``data`` (compute them together with the first computation that reads the maps, then
    call `raise_pixel_errors`), numpy scalars otherwise."""
    stats: dict[str, Any] = {}
    for name in _MAP_NAMES:
        if name in data:
            values = data[name].data
            if isinstance(values, np.ndarray):  # in memory: two fast passes prove a clean map
                low, high = values.min(), values.max()
                if np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= MAX_PIXEL_VALUE:
                    stats.update({f"{name}_nonfinite": 0, f"{name}_negative": 0})
                    stats.update({f"{name}_min": low, f"{name}_huge": 0, f"{name}_max": high})
                    continue
            stats[f"{name}_nonfinite"] = (~np.isfinite(values)).sum()
            stats[f"{name}_negative"] = (values < 0).sum()
            stats[f"{name}_min"] = values.min()
            stats[f"{name}_huge"] = (values > MAX_PIXEL_VALUE).sum()
            stats[f"{name}_max"] = values.max()
    return stats


def raise_pixel_errors(data: xr.Dataset, values: Mapping[str, Any]) -> None:
    """Raise `InputError` for the first map whose computed `pixel_checks` ``values`` show
    NaN/infinite, negative or overflowing pixels."""
    for name in _MAP_NAMES:
        if f"{name}_nonfinite" not in values:
            continue
        size = data[name].size
        nonfinite = int(values[f"{name}_nonfinite"])
        if nonfinite:
            raise InputError(
                f"{name} contains NaN or infinite pixels ({nonfinite} NaN or infinite of {size})"
            )
        negative = int(values[f"{name}_negative"])
        if negative:
            low = float(values[f"{name}_min"])
            raise InputError(
                f"{name} contains negative pixels ({negative} negative pixels, min {low:g})"
            )
        huge = int(values[f"{name}_huge"])
        if huge:
            high = float(values[f"{name}_max"])
            raise InputError(
                f"{name} contains pixels too large to compute with ({huge} above "
                f"{MAX_PIXEL_VALUE:g}, max {high:g}): their squares overflow float64"
            )


def map_center(data: xr.Dataset) -> SkyCoord:
    """Sky position of the central pixel ``((ny - 1) // 2, (nx - 1) // 2)`` (the tutorial's
    ``center_skydir``: (l, b) = (0.05, -0.05) deg on the survey map)."""
    wcs = wcs_from_attrs(data.attrs)
    return wcs.pixel_to_world((data.sizes["x"] - 1) // 2, (data.sizes["y"] - 1) // 2)


def cutout(data: xr.Dataset, position: SkyCoord, width: Any) -> xr.Dataset:
    """Cut a rectangle of angular ``width`` (lon, lat) centred on ``position`` out of ``data``.

    ``width`` is an astropy Quantity (one value or (lon, lat) pair); like the original tutorial,
    20 x 10 deg around the centre of the 0.1 deg survey map gives 200 x 100 pixels. Every
    (y, x) variable is cut; the WCS and sky coordinates follow. Plain numbers are pixels.

    Raises
    ------
    InputError
        ``data`` is not a Dataset with a WCS, or the rectangle does not overlap the map.
    ParameterError
        ``position`` is not a SkyCoord, or ``width`` is not one or two positive finite
        angles (or pixel counts).
    """
    if not isinstance(data, xr.Dataset):
        raise InputError(f"expected an xarray.Dataset, got {type(data).__name__}")
    if not isinstance(position, SkyCoord) or not position.isscalar:
        raise ParameterError(f"position must be one astropy SkyCoord, got {position!r}")
    _check_width(width)
    wcs = wcs_from_attrs(data.attrs)
    shape = (data.sizes["y"], data.sizes["x"])
    size = _lat_lon_size(width)
    try:
        # a read-only view of one value: no map-sized array for the box arithmetic
        box = Cutout2D(np.broadcast_to(False, shape), position, size, wcs=wcs, mode="trim")
    except Exception as exc:  # astropy raises NoOverlapError / ValueError
        raise InputError(f"cutout at {position} of {width} does not fit the map: {exc}") from None
    (y0, y1), (x0, x1) = ((s.start, s.stop) for s in box.slices_original)
    out = data.isel(y=slice(y0, y1), x=slice(x0, x1)).drop_vars(["lon", "lat"], errors="ignore")
    new_wcs = wcs[y0:y1, x0:x1]
    out = out.assign_coords(grid_coords(new_wcs, (y1 - y0, x1 - x0)))
    out.attrs[WCS_ATTR] = wcs_to_attrs(new_wcs)
    return out


def _check_width(width: Any) -> None:
    """One or two positive finite angles (Quantity) or pixel counts (numbers)."""
    values = width
    if isinstance(width, u.Quantity):
        if width.unit.physical_type != "angle" and width.unit != u.pix:
            raise ParameterError(f"width must be an angle or pixels, got unit {width.unit}")
        values = width.value
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim > 1 or array.size not in (1, 2):
        raise ParameterError(f"width must be one or two (lon, lat) sizes, got {width!r}")
    if not (np.all(np.isfinite(array)) and np.all(array > 0)):
        raise ParameterError(f"width must be positive and finite, got {width!r}")


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
