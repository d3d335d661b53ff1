"""FITS input maps in and out (`read_maps`, `write_maps`), and atomic file writes
(`check_output`, `atomic_output`) for every file cwtflow writes. CWT states have their own
FITS layout: `cwtflow.state_files`.
"""

from __future__ import annotations

import contextlib
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

from .errors import InputError, ParameterError, StoreError
from .maps import make_maps, validate_maps
from .provenance import add_fits_cards, provenance

__all__ = [
    "atomic_output",
    "check_output",
    "existing_file",
    "open_fits",
    "read_maps",
    "wcs_header",
    "write_maps",
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


#: What a damaged file raises from inside astropy or gzip while it is read (lazily).
READ_ERRORS = (OSError, EOFError, zlib.error)


def existing_file(path: PathLike, error: type[Exception]) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise error(f"path must be a file name, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"file not found: {path}")
    if not path.is_file():
        raise error(f"not a file: {path}")
    return path


def open_fits(path: Path, error: type[Exception]) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except READ_ERRORS as exc:
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
    except (*READ_ERRORS, ValueError, TypeError) as exc:
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
    path = existing_file(path, InputError)
    for key in (counts_hdu, background_hdu, exposure_hdu):
        if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
            raise ParameterError(f"HDU keys must be names or indices, got {key!r}")
    try:
        with warnings.catch_warnings():  # a truncated file fails below, with one message
            warnings.filterwarnings("ignore", "File may have been truncated")
            return _read_maps(path, counts_hdu, background_hdu, exposure_hdu, check_values)
    except READ_ERRORS as exc:  # a damaged file, found while reading it lazily
        raise InputError(f"cannot read {path} as FITS: {exc}") from None


def _read_maps(
    path: Path,
    counts_hdu: HDUKey,
    background_hdu: HDUKey,
    exposure_hdu: HDUKey | None,
    check_values: bool,
) -> xr.Dataset:
    with open_fits(path, InputError) as hdul:
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


def wcs_header(attrs: Mapping[str, Any]) -> fits.Header:
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
    header = wcs_header(data.attrs)
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
