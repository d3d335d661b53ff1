"""Catalog files: a `cwtflow.find_sources` table written as FITS or ECSV, read back, and drawn
as a DS9 region file. Formats follow the file name (`cwtflow.formats.catalog_format`); every
write is atomic (`cwtflow.io.atomic_output`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable, Table

from .errors import InputError, StoreError
from .formats import catalog_format
from .io import atomic_output

__all__ = ["read_catalog", "write_catalog", "write_regions"]


def _atomic_write(path: Path, overwrite: bool, write: Any) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto
    ``path`` (`cwtflow.io.atomic_output`)."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        write(tmp)
    return Path(path).expanduser()


def _check_table(table: Any, needed: tuple[str, ...]) -> Table:
    if not isinstance(table, Table):
        raise InputError(f"expected an astropy Table, got {type(table).__name__}")
    missing = [c for c in needed if c not in table.colnames]
    if missing:
        raise InputError(f"table is not a cwtflow catalog: missing {', '.join(missing)}")
    return table


def write_catalog(
    table: Table,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a catalog from `find_sources` as FITS, ECSV or a DS9 region file.

    Parameters
    ----------
    table : astropy.table.Table
        The catalog.
    path : path
        Output file; the format follows its name (``.fits``, ``.fits.gz``, ``.ecsv``, ``.reg``)
        unless ``format`` is given.
    format : {"fits", "ecsv", "ds9"}, optional
        Output format.
    overwrite : bool
        Replace an existing file (otherwise `StoreError`).

    Returns
    -------
    pathlib.Path
        The written file. The write is atomic: a temporary file in the same folder is renamed
        onto ``path`` only once complete.
    """
    path = Path(path)
    fmt = catalog_format(path, format)
    if fmt == "ds9":
        return write_regions(table, path, overwrite=overwrite)
    _check_table(table, ("lon", "lat"))
    astropy_format = "fits" if fmt == "fits" else "ascii.ecsv"
    return _atomic_write(
        path,
        overwrite,
        lambda tmp: table.write(tmp, format=astropy_format, overwrite=True),
    )


def read_catalog(path: str | os.PathLike[str]) -> QTable:
    """Read a catalog written by `write_catalog` (FITS or ECSV) as a `QTable`: units come
    back from TUNIT / the ECSV header and ``sky_centroid`` as a `SkyCoord`."""
    path = Path(path)
    fmt = catalog_format(path)
    if fmt == "ds9":
        raise InputError(f"{path} is a region file; read it with regions.Regions.read")
    if not path.is_file():
        raise StoreError(f"no catalog at {path}")
    return QTable.read(path, format="fits" if fmt == "fits" else "ascii.ecsv")


def _degrees(table: Table, name: str) -> np.ndarray:
    column = table[name]
    if isinstance(column, u.Quantity):
        return column.to_value(u.deg)
    return np.asarray(column, dtype=np.float64)


def write_regions(
    table: Table,
    path: str | os.PathLike[str],
    *,
    radius: str | u.Quantity = "pos_err_95",
    overwrite: bool = False,
) -> Path:
    """Write the sources as DS9 regions: per source a circle (its 95 % position error by
    default) labelled with the id, and for every ``extended`` source an ellipse of its fitted
    extension (semi-axes ``extension``; circular Gaussians, so equal axes).

    Parameters
    ----------
    table : astropy.table.Table
        Catalog from `find_sources` (needs ``id``, ``lon``, ``lat`` and the radius column).
    path : path
        Output region file.
    radius : {"pos_err_95", "pos_err_68", "pos_err", "extension"} or astropy Quantity
        Circle radius: a catalog column (deg) or one angle for all; radii below half a pixel
        (``meta["PIXSIZE"]``, else 0.001 deg) are raised to it so every circle is visible.
    overwrite : bool
        Replace an existing file (otherwise `StoreError`).
    """
    from regions import CircleSkyRegion, EllipseSkyRegion, Regions

    columns = ("pos_err_95", "pos_err_68", "pos_err", "extension")
    _check_table(table, ("id", "lon", "lat"))
    if isinstance(radius, str):
        if radius not in columns:
            raise InputError(f"radius must be one of {columns} or an angle, got {radius!r}")
        _check_table(table, (radius,))
        radii = _degrees(table, radius)
    else:
        if not isinstance(radius, u.Quantity) or not radius.unit.is_equivalent(u.deg):
            raise InputError(f"radius: give an angle, e.g. 0.1 * u.deg (got {radius!r})")
        radii = np.full(len(table), float(radius.to_value(u.deg)))
    floor = 0.5 * float(table.meta.get("PIXSIZE", 0.002))
    radii = np.where(np.isfinite(radii) & (radii > floor), radii, floor)
    frame = str(table.meta.get("FRAME", "galactic"))
    centers = SkyCoord(_degrees(table, "lon") * u.deg, _degrees(table, "lat") * u.deg, frame=frame)
    ids = np.asarray(table["id"])
    shapes = [
        CircleSkyRegion(center=centers[i], radius=radii[i] * u.deg, meta={"text": str(sid)})
        for i, sid in enumerate(ids)
    ]
    if "extended" in table.colnames and "extension" in table.colnames:
        extension = _degrees(table, "extension")
        for i in np.flatnonzero(np.asarray(table["extended"], dtype=bool)):
            size = 2 * max(float(extension[i]), floor) * u.deg
            shapes.append(
                EllipseSkyRegion(
                    center=centers[i],
                    width=size,
                    height=size,
                    angle=0 * u.deg,
                    meta={"text": f"{ids[i]} ext"},
                )
            )
    regions = Regions(shapes)
    return _atomic_write(
        Path(path), overwrite, lambda tmp: regions.write(str(tmp), format="ds9", overwrite=True)
    )
