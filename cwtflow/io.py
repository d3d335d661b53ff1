"""FITS storage: input sky maps in and out, CWT states out and back, atomic file writes.

Layout of a state file written by `write_state` (HDU order)::

    PRIMARY        no data; run summary cards (ITERS, CONVERGD, NSCALE, ... RESVARn) and
                   CWTATTRS, the state's attrs as JSON (the source `read_state` uses)
    COUNTS ... SUPPORT_2D   the ten 2-D images of `cwtflow.state.IMAGES`, in that order
                   (derived ones included; booleans stored as unsigned bytes)
    TRANSFORM_3D, ERROR, SUPPORT   the (scale, y, x) cubes; third FITS axis = scale index
    SCALES         binary table, column SCALE: the scale values (pixels)
    LON, LAT       pixel-centre sky coordinates (deg), stored so the round trip is exact

Every image HDU carries the map's WCS cards, ``BUNIT`` and bookkeeping cards (``CWTVAR``,
``CWTKIND``, ``CWTDIMS``, ``CWTDTYPE``, ``VARATTRS``) that let `read_state` rebuild the Dataset
exactly. Derived images are written for FITS viewers and ignored on reading.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY, FITSFixedWarning

from .analysis import images
from .errors import InputError, ParameterError, StoreError
from .maps import make_maps, validate_maps, wcs_from_attrs
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
#: Core WCS keywords named in mismatch messages (ancillary ones such as DATE-OBS are ignored).
_WCS_KEYS = ("CTYPE", "CUNIT", "CRPIX", "CRVAL", "CDELT", "PC", "CD", "LONPOLE", "LATPOLE")


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


#: What a damaged file raises from inside astropy or gzip while it is read (lazily).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _existing_file(path: PathLike, error: type[Exception]) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise error(f"path must be a file name, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"file not found: {path}")
    if not path.is_file():
        raise error(f"not a file: {path}")
    return path


def _open_fits(path: Path, error: type[Exception]) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except _READ_ERRORS as exc:
        raise error(f"cannot read {path} as FITS: {exc}") from None


def _hdu_label(hdu: fits.hdu.base._BaseHDU, index: int) -> str:
    return hdu.name or f"#{index}"


def _get_hdu(hdul: fits.HDUList, key: HDUKey, path: Path) -> fits.hdu.base._BaseHDU:
    try:
        return hdul[key]
    except (KeyError, IndexError):
        have = ", ".join(_hdu_label(h, i) for i, h in enumerate(hdul))
        raise InputError(f"HDU {key!r} not found in {path.name}; it has: {have}") from None


def _celestial_wcs(header: fits.Header, label: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
        except (ValueError, KeyError, MemoryError) as exc:
            raise InputError(f"HDU {label!r} has an unusable WCS: {exc}") from None
    if wcs.naxis != 2 or not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise InputError(f"HDU {label!r} has no 2-D celestial WCS (CTYPE {list(wcs.wcs.ctype)})")
    if (wcs.wcs.lng, wcs.wcs.lat) != (0, 1):
        raise InputError(
            f"HDU {label!r}: longitude must be the first (x) axis and latitude the second "
            f"(CTYPE {list(wcs.wcs.ctype)})"
        )
    return wcs


def _wcs_differences(a: WCS, b: WCS) -> list[str]:
    """Core WCS cards whose values differ between ``a`` and ``b`` (for messages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ha, hb = a.to_header(), b.to_header()
    keys = [k for k in dict.fromkeys([*ha, *hb]) if k.rstrip("0123456789_").startswith(_WCS_KEYS)]
    out = []
    for key in keys:
        va, vb = ha.get(key), hb.get(key)
        same = (
            math.isclose(va, vb, rel_tol=1e-10, abs_tol=1e-10)
            if isinstance(va, float) and isinstance(vb, float)
            else va == vb
        )
        if not same:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


def _read_image(
    hdul: fits.HDUList, key: HDUKey, role: str, path: Path
) -> tuple[np.ndarray, WCS, str]:
    hdu = _get_hdu(hdul, key, path)
    label = hdu.name or str(key)
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        raise InputError(f"{role} HDU {label!r} is a {type(hdu).__name__}, not an image")
    try:
        data = hdu.data
    except (*_READ_ERRORS, ValueError, TypeError) as exc:
        raise InputError(f"cannot read {role} HDU {label!r} of {path.name}: {exc}") from None
    if data is None or data.size == 0:
        raise InputError(f"empty map: {role} HDU {label!r} has no pixels")
    if data.ndim != 2:
        raise InputError(f"{role} HDU {label!r} is not a 2-D image (shape {data.shape})")
    image = np.array(data, dtype=np.float64)
    wcs = _celestial_wcs(hdu.header, label)
    return image, wcs, label


def read_maps(
    path: PathLike,
    *,
    counts_hdu: HDUKey = "COUNTS",
    background_hdu: HDUKey = "BACKGROUND",
    exposure_hdu: HDUKey | None = None,
    check_values: bool = True,
) -> xr.Dataset:
    """Read counts and background maps (and optionally exposure) from one FITS file.

    Parameters
    ----------
    path : path-like
        FITS file (``.fits`` or ``.fits.gz``) holding the images on one celestial grid.
    counts_hdu, background_hdu : str or int
        Names (EXTNAME, case-insensitive; ``"PRIMARY"`` for an unnamed primary HDU) or indices
        of the counts and predicted-background images, each of shape (ny, nx).
    exposure_hdu : str or int, optional
        HDU of the exposure map (cm2 s). ``None`` (default) reads an HDU named ``EXPOSURE``
        when the file has one and otherwise goes without exposure; a name or index makes that
        HDU required. Exposure found either way is checked like the background (shape, WCS,
        finite and non-negative values).
    check_values : bool
        Refuse NaN, infinite or negative pixels here. ``False`` leaves that pass over the pixels
        to `CWT.analyze`, which validates its input anyway (the command line reads this way,
        so that the pixels are checked once).

    Returns
    -------
    xarray.Dataset
        As `cwtflow.make_maps`: float64 ``counts``, ``background`` (and ``exposure``) on
        (y, x), ``lon``/``lat`` coordinates and the WCS of the counts HDU in ``attrs["wcs"]``.

    Raises
    ------
    InputError
        Missing file or HDU (the message lists the HDUs the file has), a non-image or empty
        HDU, shape or WCS mismatch between the HDUs, a WCS that is not 2-D celestial with
        longitude on x, NaN/infinite or negative pixels.
    """
    path = _existing_file(path, InputError)
    for key in (counts_hdu, background_hdu, exposure_hdu):
        if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
            raise ParameterError(f"HDU keys must be names or indices, got {key!r}")
    try:
        with warnings.catch_warnings():  # a truncated file fails below, with one message
            warnings.filterwarnings("ignore", "File may have been truncated")
            return _read_maps(path, counts_hdu, background_hdu, exposure_hdu, check_values)
    except _READ_ERRORS as exc:  # a damaged file, found while reading it lazily
        raise InputError(f"cannot read {path} as FITS: {exc}") from None


def _read_maps(
    path: Path,
    counts_hdu: HDUKey,
    background_hdu: HDUKey,
    exposure_hdu: HDUKey | None,
    check_values: bool,
) -> xr.Dataset:
    with _open_fits(path, InputError) as hdul:
        counts, wcs, counts_label = _read_image(hdul, counts_hdu, "counts", path)
        layers = {"counts": (counts, counts_label)}
        keys = {"background": background_hdu}
        if exposure_hdu is not None:
            keys["exposure"] = exposure_hdu
        elif "EXPOSURE" in hdul:
            keys["exposure"] = "EXPOSURE"
        for role, key in keys.items():
            image, other_wcs, label = _read_image(hdul, key, role, path)
            if image.shape != counts.shape:
                raise InputError(
                    f"{role} HDU {label!r} and counts HDU {counts_label!r} shapes differ: "
                    f"{image.shape} vs {counts.shape}"
                )
            if not wcs.wcs.compare(other_wcs.wcs, cmp=WCSCOMPARE_ANCILLARY, tolerance=1e-10):
                diff = "; ".join(_wcs_differences(other_wcs, wcs)) or "projection parameters"
                raise InputError(
                    f"WCS of {role} HDU {label!r} differs from counts HDU {counts_label!r}: {diff}"
                )
            layers[role] = (image, label)
    exposure = layers.get("exposure", (None, None))[0]
    data = make_maps(counts, layers["background"][0], wcs, exposure=exposure)
    return validate_maps(data) if check_values else data


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
            hdus.append(_image_hdu(name, "coord", state[name].variable, wcs_header))
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
    path = _existing_file(path, StoreError)
    try:
        with warnings.catch_warnings():  # a truncated file fails below, with one message
            warnings.filterwarnings("ignore", "File may have been truncated")
            return _read_state(path)
    except _READ_ERRORS as exc:  # a damaged file, found while reading it lazily
        raise StoreError(f"cannot read {path} as FITS: {exc}") from None


def _read_state(path: Path) -> xr.Dataset:
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
            except (*_READ_ERRORS, ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"cannot read HDU {hdu.name} of {path.name}: {exc}") from None
            target = coords if kind == "coord" else data_vars
            target[name] = xr.Variable(dims, values, var_attrs)
    missing = [name for name in (*STATE_VARS, "scale") if name not in {*data_vars, *coords}]
    if missing:
        raise StoreError(f"{path.name} is not a complete cwtflow state: no HDU for {missing}")
    ordered = {name: data_vars.pop(name) for name in STATE_VARS}
    return xr.Dataset({**ordered, **data_vars}, coords=coords, attrs=attrs)
