"""File formats by name: the one place that maps a path's suffix to what cwtflow writes there.

- results (`cwtflow run --out`): FITS (`cwtflow.state_files.write_state`) or a zarr store (a run's
  history, `cwtflow.store_writer`);
- catalogs (`cwtflow.catalog_files`): FITS or ECSV tables, DS9 region files.

Suffixes are matched case-insensitively, longest first (``.fits.gz`` before ``.gz``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

__all__ = [
    "CATALOG_SUFFIXES",
    "FITS_SUFFIXES",
    "REGION_SUFFIXES",
    "STORE_SUFFIX",
    "catalog_format",
    "is_store",
    "result_format",
]

#: FITS files, plain or gzip-compressed.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
#: A zarr store (a directory).
STORE_SUFFIX = ".zarr"
#: Catalog tables: suffix -> format.
CATALOG_SUFFIXES = {**dict.fromkeys(FITS_SUFFIXES, "fits"), ".ecsv": "ecsv"}
#: DS9 region files.
REGION_SUFFIXES = (".reg",)
_CATALOG_FORMATS = ("fits", "ecsv", "ds9")


def _name(path: str | os.PathLike[str]) -> str:
    return Path(path).name.lower()


def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a zarr store (``.zarr``)."""
    return _name(path).endswith(STORE_SUFFIX)


def result_format(path: str | os.PathLike[str]) -> str:
    """``"fits"`` or ``"zarr"``: the format of a result written to ``path``."""
    name = _name(path)
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    if name.endswith(STORE_SUFFIX):
        return "zarr"
    raise InputError(f"unsupported output format: {Path(path).name} (use .fits, .fits.gz or .zarr)")


def catalog_format(
    path: str | os.PathLike[str], format: str | None = None, *, regions: bool = True
) -> str:
    """``"fits"``, ``"ecsv"`` or ``"ds9"``: the format of a catalog written to ``path``.

    ``format`` overrides the suffix. With ``regions=False`` a region file is refused (a
    catalog table is asked for).
    """
    if format is not None:
        if format not in _CATALOG_FORMATS:
            raise InputError(f"unknown catalog format {format!r}: use 'fits', 'ecsv' or 'ds9'")
        return format
    name = _name(path)
    tables = ", ".join(sorted(CATALOG_SUFFIXES, key=len))
    if name.endswith(REGION_SUFFIXES):
        if not regions:
            raise InputError(
                f"{Path(path).name} is a region file name; a catalog table takes one of {tables}"
            )
        return "ds9"
    for suffix in sorted(CATALOG_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return CATALOG_SUFFIXES[suffix]
    allowed = tables + (", .reg" if regions else "")
    raise InputError(f"cannot tell the catalog format of {Path(path).name!r}: use one of {allowed}")
