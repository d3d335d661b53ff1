"""FITS input maps in and out (`read_maps`, `write_maps`), and atomic file writes
(`check_output`, `atomic_output`) for every file cwtflow writes.

`read_maps` reads FITS or zarr maps through `cwtflow.inputs` (lazy chunk-wise reads of large
inputs, separate background/exposure files, one-bin energy cubes; gzip above 256 MiB is
converted once with `cwtflow.convert`). CWT states have their own FITS layout:
`cwtflow.state_files`.
"""

from __future__ import annotations

import contextlib
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
from astropy.wcs import FITSFixedWarning

from .errors import InputError, ParameterError, StoreError
from .inputs import Source, existing_file, read_inputs
from .maps import validate_layout, validate_maps
from .provenance import add_fits_cards, provenance

__all__ = [
    "READ_ERRORS",
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
#: What a damaged file raises from inside astropy or gzip while it is read (lazily).
READ_ERRORS = (OSError, EOFError, zlib.error)


# --------------------------------------------------------------------------------------------
# Outputs


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


def open_fits(path: Path, error: type[Exception]) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except READ_ERRORS as exc:
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
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"path must be a file name, got {type(path).__name__}")
    for key in (counts_hdu, background_hdu, exposure_hdu):
        if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
            raise ParameterError(f"HDU keys must be names or indices, got {key!r}")
    try:
        with warnings.catch_warnings():  # a truncated file fails below, with one message
            warnings.filterwarnings("ignore", "File may have been truncated")
            data = read_inputs(
                path,
                counts_hdu=counts_hdu,
                background_hdu=background_hdu,
                exposure_hdu=exposure_hdu,
                background=background,
                exposure=exposure,
                chunks=chunks,
            )
    except READ_ERRORS as exc:  # a damaged file, found while it is read
        raise InputError(f"cannot read {path} as FITS: {exc}") from None
    lazy = data["counts"].chunks is not None
    if check_values or (check_values is None and not lazy):
        return validate_maps(data)
    return validate_layout(data)


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
