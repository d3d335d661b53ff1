"""FITS storage: input sky maps in and out, CWT states out and back, atomic file writes.

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

import contextlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY, FITSFixedWarning

from .core import update_model
from .errors import InputError, StoreError
from .maps import make_maps, sky_coordinates, validate_maps, wcs_from_attrs
from .provenance import add_fits_cards, provenance
from .state import CARRIED, STATE_VARS
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
    """Check that ``path`` can receive a new file (replacing an existing one only with
    ``overwrite``) and return it as a `Path`. ``hint`` is how the caller enables overwriting,
    quoted in the error message (the CLI says ``--overwrite``).

    Raises `StoreError` when the folder does not exist or is not a folder, the path is a
    folder, or the file exists and ``overwrite`` is false.
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


def _existing_file(path: PathLike, error: type[Exception]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"file not found: {path}")
    if not path.is_file():
        raise error(f"not a file: {path}")
    return path


def _open_fits(path: Path, error: type[Exception]) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except OSError as exc:
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
    except (OSError, ValueError, TypeError) as exc:
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


def write_maps(
    data: xr.Dataset,
    path: PathLike,
    *,
    overwrite: bool = False,
    provenance_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write input maps in the layout `read_maps` reads by default.

    ``counts`` goes to the primary HDU (EXTNAME ``COUNTS``; int32 when every value is an
    integer that fits, float64 otherwise), ``background`` to ``BACKGROUND`` and ``exposure``
    (when present) to ``EXPOSURE``, each with the WCS cards of ``attrs["wcs"]``. Values read back
    by `read_maps` are identical. The write is atomic (see `atomic_output`). The primary header
    records ``provenance_record`` (`cwtflow.provenance.provenance`; by default one without
    inputs or command).

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
    add_fits_cards(hdus[0].header, dict(provenance_record or provenance()))
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


def _stored_values(values: np.ndarray) -> np.ndarray:
    """The array as stored: booleans as uint8, integral floats that fit as int32."""
    if values.dtype == bool:
        return values.astype(np.uint8)
    integral = values.dtype.kind == "f" and np.array_equal(values, np.round(values))
    return values.astype(np.int32) if integral and np.all(np.abs(values) < 2**31) else values


def _image_hdu(
    name: str, kind: str, var: xr.Variable, wcs_header: fits.Header
) -> fits.CompImageHDU:
    values = _stored_values(np.asarray(var.values))
    header = wcs_header.copy()
    if var.ndim == 3:
        header["WCSAXES"] = 3
        header["CTYPE3"] = ("SCALE", "wavelet scale index; values in the SCALES table")
        header["CRPIX3"] = 1.0
        header["CRVAL3"] = 0.0
        header["CDELT3"] = 1.0
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
    wcs_header = _wcs_header(state.attrs)
    primary = _primary_hdu(state.attrs)
    add_fits_cards(primary.header, dict(provenance_record or provenance()))
    lonlat = sky_coordinates(wcs_from_attrs(state.attrs), (state.sizes["y"], state.sizes["x"]))
    rebuilt = {
        c: dict(state[c].attrs)
        for c, values in zip(("lon", "lat"), lonlat, strict=True)
        if c in state.coords and np.array_equal(state[c].values, values)
    }
    if np.array_equal(_transform_2d(state), np.asarray(state["transform_2d"].values)):
        rebuilt["transform_2d"] = dict(state["transform_2d"].attrs)
    primary.header["CWTREBLT"] = (_to_json(rebuilt, "attrs"), "not stored: rebuilt, attrs")
    hdus: list[Any] = [primary]
    for name in (*STATE_VARS, *CARRIED):
        if name in state.data_vars and name not in rebuilt:
            hdus.append(_image_hdu(name, "data", state[name].variable, wcs_header))
    scale = state["scale"].variable
    hdus += [
        _image_hdu(c, "coord", state[c].variable, wcs_header)
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
    path = _existing_file(path, StoreError)
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
        rebuilt = _json_card(primary, "CWTREBLT", path.name) if "CWTREBLT" in primary else {}
        if "transform_2d" in rebuilt and {"support", "transform_3d"} <= data_vars.keys():
            t2 = _transform_2d(data_vars)
            data_vars["transform_2d"] = xr.Variable(("y", "x"), t2, rebuilt["transform_2d"])
        if {"lon", "lat"} & rebuilt.keys() and "counts" in data_vars:
            lonlat = sky_coordinates(wcs_from_attrs(attrs), data_vars["counts"].shape)
            for name, values in zip(("lon", "lat"), lonlat, strict=True):
                if name in rebuilt:
                    coords[name] = xr.Variable(("y", "x"), values, rebuilt[name])
    missing = [name for name in (*STATE_VARS, "scale") if name not in {*data_vars, *coords}]
    if missing:
        raise StoreError(f"{path.name} is not a complete cwtflow state: no HDU for {missing}")
    ordered = {name: data_vars.pop(name) for name in STATE_VARS}
    return xr.Dataset({**ordered, **data_vars}, coords=coords, attrs=attrs)
