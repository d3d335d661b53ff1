"""FITS storage: input sky maps in and out, CWT states out and back, atomic file writes.

`read_maps` reads FITS or zarr maps through `cwtflow.inputs` (lazy chunk-wise reads of large
inputs, separate background/exposure files, one-bin energy cubes; gzip above 256 MiB is
converted once with `cwtflow.convert`).

Layout of a state file written by `write_state` (HDU order)::

    PRIMARY        no data; run summary cards (ITERS, CONVERGD, NSCALE, ... RESVARn) and
                   CWTATTRS, the state's attrs as JSON (the source `read_state` uses)
    COUNTS ... SUPPORT_2D   the ten 2-D images of `cwtflow.state.IMAGES`, in that order
                   (derived ones included; booleans stored as unsigned bytes)
    TRANSFORM_3D, ERROR, SUPPORT   the (scale, y, x) cubes; third FITS axis = scale index
    SCALES         binary table, column SCALE: the scale values (pixels)
    LON, LAT       pixel-centre sky coordinates (deg), stored so the round trip is exact:
                   1-D (longitude per column, latitude per row, no WCS cards) for a separable
                   grid, absent when the state has none (the WCS cards are the grid)

Every image HDU carries the map's WCS cards, ``BUNIT`` and bookkeeping cards (``CWTVAR``,
``CWTKIND``, ``CWTDIMS``, ``CWTDTYPE``, ``VARATTRS``) that let `read_state` rebuild the Dataset
exactly. Derived images are written for FITS viewers and ignored on reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import FITSFixedWarning

from .analysis import images
from .errors import InputError, StoreError
from .inputs import Source, existing_file, read_inputs
from .maps import validate_layout, validate_maps, wcs_from_attrs
from .state import CARRIED, CUBES, IMAGES, STATE_VARS
from .version import __version__

__all__ = [
    "atomic_output",
    "check_output",
    "read_maps",
    "read_state",
    "write_maps",
    "write_state",
]

PathLike = str | os.PathLike[str]
HDUKey = str | int

#: Card in the primary header that marks a cwtflow state file (its value: the writer's version).
MARKER = "CWTFLOW"


# --------------------------------------------------------------------------------------------
# Output paths


def check_output(path: PathLike, *, overwrite: bool = False, hint: str = "overwrite=True") -> Path:
    """Check that ``path`` can receive a new file and return it as a `Path`.

    Parameters
    ----------
    path : path-like
        File to be written.
    overwrite : bool
        Allow replacing an existing file.
    hint : str
        How the caller enables overwriting, quoted in the error message (the CLI says
        ``--overwrite``).

    Raises
    ------
    StoreError
        The folder does not exist or is not a folder, the path is a folder, or the file exists
        and ``overwrite`` is false.
    """
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.exists():
        raise StoreError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise StoreError(f"output folder is not a folder: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"output folder is not writable: {parent}")
    if path.is_dir():
        raise StoreError(f"output path is a folder: {path}")
    if path.exists() and not overwrite:
        raise StoreError(f"output file exists: {path} (use {hint} to replace it)")
    return path


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path in the same folder, then rename it.

    The temporary name ends with the target's suffixes (``.fits.gz`` stays gzip-compressed).
    On success it replaces ``path`` with `os.replace`; on any error it is removed and ``path``
    is untouched. The existence check happens before and again just before the rename.

    Raises
    ------
    StoreError
        As `check_output`, or when the write itself fails with an `OSError`.
    """
    path = check_output(path, overwrite=overwrite)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        if not overwrite and path.exists():
            raise StoreError(f"output file exists: {path} (appeared during the write)")
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# Input maps


def _open_fits(path: Path, error: type[Exception]) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except OSError as exc:
        raise error(f"cannot read {path} as FITS: {exc}") from None


def read_maps(
    path: PathLike,
    *,
    counts_hdu: HDUKey = "COUNTS",
    background_hdu: HDUKey = "BACKGROUND",
    exposure_hdu: HDUKey | None = None,
    background: Source | None = None,
    exposure: Source | None = None,
    chunks: Any = "auto",
    check_values: bool | None = None,
) -> xr.Dataset:
    """Read counts and background maps (and optionally exposure) from FITS or zarr.

    Parameters
    ----------
    path : path-like
        FITS file (``.fits`` or ``.fits.gz``) holding the images on one celestial grid, or a
        zarr directory (a Dataset written by cwtflow/xarray, e.g. by ``cwtflow convert``, or a
        plain zarr group with 2-D ``counts``/``background`` (``exposure``) arrays and the WCS
        cards in ``attrs["wcs"]``). How each is read: `cwtflow.inputs`.
    counts_hdu, background_hdu : str or int
        Names (EXTNAME, case-insensitive; ``"PRIMARY"`` for an unnamed primary HDU) or indices
        of the counts and predicted-background images, each of shape (ny, nx) (or a one-bin
        energy cube (1, ny, nx), squeezed).
    exposure_hdu : str or int, optional
        HDU of the exposure map (cm2 s). ``None`` (default) reads an HDU named ``EXPOSURE``
        when the file has one and otherwise goes without exposure; a name or index makes that
        HDU required. Exposure found either way is checked like the background (shape, WCS,
        finite and non-negative values).
    background, exposure : path or (path, HDU), optional
        Read that map from another FITS file instead (``"bkg.fits[BACKGROUND]"`` also works);
        without an HDU, the one named BACKGROUND / EXPOSURE, else the file's only image.
    chunks : "auto", None, int or (int, int)
        ``None``: numpy arrays in memory. A tile size: dask arrays read chunk by chunk from
        the file (an uncompressed FITS through a memory map, zarr chunk-wise). ``"auto"``
        (default): lazy with 1024 x 1024 tiles when the maps hold more than 256 MiB as
        float64 (`cwtflow.inputs.IN_MEMORY_BYTES`), in memory otherwise. A compressed FITS
        above that size is refused: convert it once (``cwtflow convert``).
    check_values : bool, optional
        Refuse NaN, infinite or negative pixels here. ``None`` (default): for an in-memory
        read; a lazy read is checked by `CWT.analyze` in the computation that first reads its
        pixels (no pass of its own). ``False`` leaves the check to `CWT.analyze` in every case
        (the command line reads this way); ``True`` checks here, lazy or not.

    Returns
    -------
    xarray.Dataset
        As `cwtflow.make_maps`: float64 ``counts``, ``background`` (and ``exposure``) on
        (y, x), 1-D ``lon``/``lat`` coordinates when the grid is separable and the WCS of the
        counts in ``attrs["wcs"]``.

    Raises
    ------
    InputError
        Missing file or HDU (the message lists the HDUs the file has), a non-image or empty
        HDU, a cube of more than one plane, shape or WCS mismatch between the maps, a WCS that
        is not 2-D celestial with longitude on x, NaN/infinite or negative pixels.
    """
    data = read_inputs(
        path,
        counts_hdu=counts_hdu,
        background_hdu=background_hdu,
        exposure_hdu=exposure_hdu,
        background=background,
        exposure=exposure,
        chunks=chunks,
    )
    lazy = data["counts"].chunks is not None
    if check_values or (check_values is None and not lazy):
        return validate_maps(data)
    return validate_layout(data)


def _wcs_header(attrs: Mapping[str, Any]) -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return fits.Header(dict(attrs["wcs"]))


def write_maps(data: xr.Dataset, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write input maps in the layout `read_maps` reads by default.

    ``counts`` goes to the primary HDU (EXTNAME ``COUNTS``; int32 when every value is an
    integer that fits, float64 otherwise), ``background`` to ``BACKGROUND`` and ``exposure``
    (when present) to ``EXPOSURE``, each with the WCS cards of ``attrs["wcs"]``. Values read back
    by `read_maps` are identical. The write is atomic (see `atomic_output`).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    data = validate_maps(data)
    header = _wcs_header(data.attrs)
    counts = data["counts"].values
    as_int = np.array_equal(counts, np.round(counts)) and counts.max() < 2**31
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(counts.astype(np.int32) if as_int else counts, header=header.copy())
    ]
    hdus[0].header["EXTNAME"] = "COUNTS"
    hdus[0].header["BUNIT"] = "count"
    for name, unit in (("background", "count"), ("exposure", "cm2 s")):
        if name in data:
            hdu = fits.ImageHDU(
                np.asarray(data[name].values, dtype=np.float64),
                header=header.copy(),
                name=name.upper(),
            )
            hdu.header["BUNIT"] = unit
            hdus.append(hdu)
    with atomic_output(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path).expanduser()


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


def _image_hdu(name: str, kind: str, var: xr.Variable, wcs_header: fits.Header) -> fits.ImageHDU:
    values = np.asarray(var.values)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    header = wcs_header.copy()
    if var.ndim == 3:
        header["WCSAXES"] = 3
        header["CTYPE3"] = ("SCALE", "wavelet scale index; values in the SCALES table")
        header["CRPIX3"] = 1.0
        header["CRVAL3"] = 0.0
        header["CDELT3"] = 1.0
    hdu = fits.ImageHDU(values, header=header, name=name.upper())
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


def write_state(state: xr.Dataset, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write a CWT state (e.g. the result of `CWT.analyze`) to one FITS file.

    Parameters
    ----------
    state : xarray.Dataset
        A state with every variable of `cwtflow.state.STATE_VARS`, the ``scale`` coordinate and
        the WCS in ``attrs["wcs"]``; numpy- or dask-backed (computed variable by variable).
        Its attrs must be JSON-representable (numbers, strings, booleans, None, lists, dicts;
        tuples come back as lists).
    path : path-like
        Output file; ``.fits.gz`` is gzip-compressed.
    overwrite : bool
        Replace an existing file instead of refusing it.

    Returns
    -------
    pathlib.Path
        The file written. The layout is described in this module's docstring; the write is
        atomic (`atomic_output`).

    Raises
    ------
    InputError
        ``state`` lacks a state variable, the scale coordinate or the WCS, or has attrs that
        cannot be stored.
    StoreError
        The output exists (without ``overwrite``) or cannot be written.
    """
    if not isinstance(state, xr.Dataset):
        raise InputError(f"expected a state xarray.Dataset, got {type(state).__name__}")
    missing = [name for name in (*STATE_VARS, "scale") if name not in state.variables]
    if missing:
        raise InputError(f"not a CWT state: missing {', '.join(missing)}")
    wcs_from_attrs(state.attrs)
    check_output(path, overwrite=overwrite)
    wcs_header = _wcs_header(state.attrs)
    imgs = images(state)
    hdus: list[Any] = [_primary_hdu(state.attrs)]
    for name in IMAGES:
        kind = "data" if name in STATE_VARS else "derived"
        hdus.append(_image_hdu(name, kind, imgs[name].variable, wcs_header))
    for name in CUBES:
        hdus.append(_image_hdu(name, "data", state[name].variable, wcs_header))
    for name in CARRIED:
        if name in state.data_vars:
            hdus.append(_image_hdu(name, "data", state[name].variable, wcs_header))
    scale = state["scale"].variable
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="SCALE", format="D", unit=scale.attrs.get("units"), array=scale.values)],
        name="SCALES",
    )
    _bookkeeping(table.header, "scale", "coord", scale)
    hdus.append(table)
    for name in ("lon", "lat"):
        if name in state.coords:
            var = state[name].variable  # 1-D (on x / on y) since maps builds 1-D coordinates
            header = wcs_header if var.ndim == 2 else fits.Header()
            hdus.append(_image_hdu(name, "coord", var, header))
    with atomic_output(path, overwrite=overwrite) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path).expanduser()


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
    with _open_fits(path, StoreError) as hdul:
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
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"cannot read HDU {hdu.name} of {path.name}: {exc}") from None
            target = coords if kind == "coord" else data_vars
            target[name] = xr.Variable(dims, values, var_attrs)
    missing = [name for name in (*STATE_VARS, "scale") if name not in {*data_vars, *coords}]
    if missing:
        raise StoreError(f"{path.name} is not a complete cwtflow state: no HDU for {missing}")
    ordered = {name: data_vars.pop(name) for name in STATE_VARS}
    return xr.Dataset({**ordered, **data_vars}, coords=coords, attrs=attrs)
