"""FITS files of CWT states: `write_state` and `read_state`.

Layout of a state file written by `write_state`: a data-less PRIMARY HDU (run summary cards
ITERS, CONVERGD, NSCALE, ... RESVARn; provenance cards DATE, CREATOR, INPUTn, SHA256_n and the
JSON card CWTPROV; CWTATTRS, the state's attrs as JSON, the source `read_state` uses), one
image HDU per stored variable of `STATE_VARS` (then EXPOSURE; cubes with the scale index as
third FITS axis) and the SCALES table (column SCALE, pixels). Each image HDU carries the WCS
cards, ``BUNIT`` and the cards ``CWTVAR``, ``CWTKIND``, ``CWTDIMS``, ``CWTDTYPE`` and
``VARATTRS`` that let `read_state` rebuild the Dataset exactly.

Only what a reader cannot rebuild is stored, with lossless FITS tile compression (GZIP_2
without quantisation for floats, RICE_1 for integers): counts as int32 when integral, booleans
as uint8, other floats as float64. Not stored: the derived images (`cwtflow.images` recomputes
them), the lon/lat coordinates (rebuilt from the WCS) and ``transform_2d`` when it is exactly
``sum_i S_i T_i`` of the stored cubes; the JSON card CWTREBLT names what is rebuilt.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits

from .core import update_model
from .errors import InputError, StoreError
from .io import (
    MARKER,
    READ_ERRORS,
    PathLike,
    atomic_output,
    check_output,
    existing_file,
    open_fits,
    wcs_header,
)
from .maps import grid_coords, wcs_from_attrs
from .provenance import add_fits_cards, provenance
from .state import CARRIED, STATE_VARS
from .version import __version__

__all__ = ["read_state", "write_state"]


# --------------------------------------------------------------------------------------------
# States


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_jsonable, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} cannot be stored as JSON: {exc}") from None


def _bookkeeping(header: fits.Header, name: str, kind: str, var: xr.Variable) -> None:
    header["CWTVAR"] = (name, "cwtflow variable name")
    header["CWTKIND"] = (kind, "data, coord or derived (derived: not read back)")
    header["CWTDIMS"] = (",".join(var.dims), "xarray dims, slowest first")
    header["CWTDTYPE"] = (str(var.dtype), "dtype in memory")
    units = var.attrs.get("units")
    if units and units != "1":
        header["BUNIT"] = units
    header["VARATTRS"] = _to_json(dict(var.attrs), f"attrs of {name!r}")


def _stored_values(values: np.ndarray) -> np.ndarray:
    """The array as stored: booleans as uint8, integral floats that fit as int32."""
    if values.dtype == bool:
        return values.astype(np.uint8)
    integral = values.dtype.kind == "f" and np.array_equal(values, np.round(values))
    return values.astype(np.int32) if integral and np.all(np.abs(values) < 2**31) else values


def _image_hdu(
    name: str, kind: str, var: xr.Variable, wcs_header: fits.Header
) -> fits.ImageHDU | fits.CompImageHDU:
    values = _stored_values(np.asarray(var.values))
    header = wcs_header.copy()
    if var.ndim == 3:
        header["WCSAXES"] = 3
        header["CTYPE3"] = ("SCALE", "wavelet scale index; values in the SCALES table")
        header["CRPIX3"] = 1.0
        header["CRVAL3"] = 0.0
        header["CDELT3"] = 1.0
    if values.ndim < 2:  # a 1-D coordinate that the WCS cannot rebuild
        hdu = fits.ImageHDU(values, name=name.upper())
        _bookkeeping(hdu.header, name, kind, var)
        return hdu
    # lossless tile compression, tiles of about 64k pixels (whole rows)
    rows = max(1, min(values.shape[-2], 65536 // values.shape[-1]))
    hdu = fits.CompImageHDU(
        values,
        header=header,
        name=name.upper(),
        compression_type="RICE_1" if values.dtype.kind in "iu" else "GZIP_2",
        quantize_level=0.0,
        tile_shape=(1,) * (values.ndim - 2) + (rows, values.shape[-1]),
    )
    _bookkeeping(hdu.header, name, kind, var)
    return hdu


def _primary_hdu(attrs: Mapping[str, Any]) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    header = hdu.header
    header[MARKER] = (__version__, "cwtflow CWT state file, writer version")
    if "iterations" in attrs:
        header["ITERS"] = (int(attrs["iterations"]), "iterations run")
    if "converged" in attrs:
        header["CONVERGD"] = (bool(attrs["converged"]), "stopped by the tolerance")
    params = attrs.get("parameters") or {}
    cards = {
        "n_scale": ("NSCALE", "number of wavelet scales"),
        "min_scale": ("MINSCALE", "smallest scale (pixels)"),
        "step_scale": ("STEPSCAL", "ratio between successive scales"),
        "max_iter": ("MAXITER", "maximum number of iterations"),
        "tol": ("TOL", "relative residual-variance tolerance"),
        "significance_threshold": ("SIGTHR", "significance threshold"),
        "significance_island_threshold": ("ISLTHR", "island significance threshold"),
        "remove_isolated": ("RMISOL", "one-pixel components dropped"),
        "wrap_lon": ("WRAPLON", "periodic longitude (absent: automatic)"),
    }
    for key, (card, comment) in cards.items():
        if params.get(key) is not None:
            header[card] = (params[key], comment)
    for i, variance in enumerate(attrs.get("residual_variance") or [], start=1):
        header[f"RESVAR{i}"] = (float(variance), f"residual variance after iteration {i}")
    header["CWTATTRS"] = _to_json(dict(attrs), "state attrs")
    return hdu


def write_state(
    state: xr.Dataset,
    path: PathLike,
    *,
    overwrite: bool = False,
    provenance_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a CWT state (e.g. the result of `CWT.analyze`) to one FITS file.

    Parameters
    ----------
    state : xarray.Dataset
        A state with every variable of `cwtflow.state.STATE_VARS`, the ``scale`` coordinate and
        the WCS in ``attrs["wcs"]``; numpy- or dask-backed (computed variable by variable).
        Its attrs must be JSON-representable (numbers, strings, booleans, None, lists, dicts;
        tuples come back as lists).
    path : path-like
        Output file; ``.fits.gz`` is gzip-compressed as a whole.
    overwrite : bool
        Replace an existing file instead of refusing it.
    provenance_record : dict, optional
        `cwtflow.provenance.provenance` record for the primary header (by default one with
        the date and package versions, no inputs or command).

    Returns the file written (layout: this module's docstring; the write is atomic,
    `atomic_output`). Raises `InputError` when ``state`` lacks a state variable, the scale
    coordinate or the WCS, or has attrs that cannot be stored, and `StoreError` when the output
    exists (without ``overwrite``) or cannot be written.
    """
    if not isinstance(state, xr.Dataset):
        raise InputError(f"expected a state xarray.Dataset, got {type(state).__name__}")
    missing = [name for name in (*STATE_VARS, "scale") if name not in state.variables]
    if missing:
        raise InputError(f"not a CWT state: missing {', '.join(missing)}")
    wcs_from_attrs(state.attrs)
    check_output(path, overwrite=overwrite)
    header = wcs_header(state.attrs)
    primary = _primary_hdu(state.attrs)
    add_fits_cards(primary.header, dict(provenance_record or provenance()))
    grid = grid_coords(wcs_from_attrs(state.attrs), (state.sizes["y"], state.sizes["x"]))
    rebuilt = {
        c: dict(state[c].attrs)
        for c in ("lon", "lat")
        if c in state.coords
        and c in grid
        and state[c].dims == grid[c].dims
        and np.array_equal(state[c].values, grid[c].values)
    }
    if np.array_equal(_transform_2d(state), np.asarray(state["transform_2d"].values)):
        rebuilt["transform_2d"] = dict(state["transform_2d"].attrs)
    primary.header["CWTREBLT"] = (_to_json(rebuilt, "attrs"), "not stored: rebuilt, attrs")
    hdus: list[Any] = [primary]
    for name in (*STATE_VARS, *CARRIED):
        if name in state.data_vars and name not in rebuilt:
            hdus.append(_image_hdu(name, "data", state[name].variable, header))
    scale = state["scale"].variable
    hdus += [
        _image_hdu(c, "coord", state[c].variable, header)
        for c in ("lon", "lat")
        if c in state.coords and c not in rebuilt
    ]
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="SCALE", format="D", unit=scale.attrs.get("units"), array=scale.values)],
        name="SCALES",
    )
    _bookkeeping(table.header, "scale", "coord", scale)
    hdus.append(table)
    with atomic_output(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path).expanduser()


def _transform_2d(state: xr.Dataset | dict[str, xr.Variable]) -> np.ndarray:
    """``sum_i S_i T_i`` of the state's cubes, as `cwtflow.core.update_model` computes it."""
    support, transform = (np.asarray(state[n].values) for n in ("support", "transform_3d"))
    return update_model(np.zeros(support.shape[1:]), support, transform)[0]


def _json_card(header: fits.Header, key: str, label: str) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{label}: card {key} is missing or not JSON ({exc})") from None


def read_state(path: PathLike) -> xr.Dataset:
    """Read a state written by `write_state` back into an identical state Dataset.

    Parameters
    ----------
    path : path-like
        A FITS file written by `write_state`.

    Returns
    -------
    xarray.Dataset
        The state variables (same dims, dtypes, values and attrs), the ``lon``/``lat`` and
        ``scale`` coordinates and the attrs, numpy-backed. Derived images are not part of it
        (compute them with `cwtflow.images`).

    Raises
    ------
    StoreError
        Missing or unreadable file, or a file that is not a complete cwtflow state.
    """
    path = existing_file(path, StoreError)
    try:
        with warnings.catch_warnings():  # a truncated file fails below, with one message
            warnings.filterwarnings("ignore", "File may have been truncated")
            return _read_state(path)
    except READ_ERRORS as exc:  # a damaged file, found while reading it lazily
        raise StoreError(f"cannot read {path} as FITS: {exc}") from None


def _read_state(path: Path) -> xr.Dataset:
    with open_fits(path, StoreError) as hdul:
        primary = hdul[0].header
        if MARKER not in primary:
            raise StoreError(f"{path.name} is not a cwtflow state file (no {MARKER} card)")
        attrs = _json_card(primary, "CWTATTRS", path.name)
        data_vars: dict[str, xr.Variable] = {}
        coords: dict[str, xr.Variable] = {}
        for hdu in hdul[1:]:
            kind = hdu.header.get("CWTKIND")
            if kind not in ("data", "coord"):
                continue
            var_attrs = _json_card(hdu.header, "VARATTRS", f"HDU {hdu.name}")
            try:
                name = hdu.header["CWTVAR"]
                dims = tuple(hdu.header["CWTDIMS"].split(","))
                values = hdu.data["SCALE"] if name == "scale" else hdu.data
                values = np.asarray(values).astype(hdu.header["CWTDTYPE"])
            except (*READ_ERRORS, ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"cannot read HDU {hdu.name} of {path.name}: {exc}") from None
            target = coords if kind == "coord" else data_vars
            target[name] = xr.Variable(dims, values, var_attrs)
        rebuilt = _json_card(primary, "CWTREBLT", path.name) if "CWTREBLT" in primary else {}
        if "transform_2d" in rebuilt and {"support", "transform_3d"} <= data_vars.keys():
            t2 = _transform_2d(data_vars)
            data_vars["transform_2d"] = xr.Variable(("y", "x"), t2, rebuilt["transform_2d"])
        if {"lon", "lat"} & rebuilt.keys() and "counts" in data_vars:
            grid = grid_coords(wcs_from_attrs(attrs), data_vars["counts"].shape)
            for name in ("lon", "lat"):
                if name in rebuilt and name in grid:
                    coords[name] = xr.Variable(grid[name].dims, grid[name].values, rebuilt[name])
    missing = [name for name in (*STATE_VARS, "scale") if name not in {*data_vars, *coords}]
    if missing:
        raise StoreError(f"{path.name} is not a complete cwtflow state: no HDU for {missing}")
    ordered = {name: data_vars.pop(name) for name in STATE_VARS}
    return xr.Dataset({**ordered, **data_vars}, coords=coords, attrs=attrs)
