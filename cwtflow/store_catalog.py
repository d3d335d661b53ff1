"""A source catalog kept in a run's zarr store, next to its history (group ``catalog``), and
the catalog of a stored result (`catalog_of_result`, the policy of ``cwtflow catalog``).

Layout: one 1-D array per catalog column on the dimension ``source``, each with ``units`` and
``description`` attrs (plain zarr readers see them as they see the iterations); the group attrs
hold the table's meta and the completion marker. The group counts only once that marker is
written, after its data; replacing a catalog removes the old marker first, so a run killed
midway leaves an ignored leftover, never a half-written catalog that reads as complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable, Table

from .catalog import find_sources
from .errors import InputError, StoreError
from .formats import is_store
from .history import open_history
from .io import read_maps
from .state_files import read_state
from .store import delete_group, is_complete, open_group
from .store_integrity import WRITE_OPTIONS, check_group, checksummed, open_pinned, seal_group
from .store_lock import StoreLock

__all__ = ["CATALOG_GROUP", "catalog_of_result", "read_store_catalog", "write_store_catalog"]

CATALOG_GROUP = "catalog"


def _json_meta(meta: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(meta), default=str))


def write_store_catalog(
    path: str | os.PathLike[str], table: Table, *, overwrite: bool = False
) -> None:
    """Keep ``table`` (from `cwtflow.find_sources`) in the run store at ``path``.

    Parameters
    ----------
    path : path
        A store written by ``CWT.analyze(..., store=path)`` (checked with `open_history`).
    table : astropy.table.Table
        The catalog; numeric columns, one row per source (zero rows allowed).
    overwrite : bool
        Replace a catalog already in the store (otherwise `StoreError`).
    """
    path = Path(path).expanduser()
    open_history(path)  # refuses anything that is not a readable cwtflow store
    with StoreLock(path):  # one writer at a time
        _write(path, table, overwrite=overwrite)


def _write(path: Path, table: Table, *, overwrite: bool) -> None:
    if is_complete(open_group(path, CATALOG_GROUP)) and not overwrite:
        raise StoreError(f"{path} already holds a catalog (use overwrite to replace it)")
    delete_group(path, CATALOG_GROUP)
    columns = {}
    names = []
    for name in table.colnames:
        column = table[name]
        if isinstance(column, SkyCoord):
            continue  # rebuilt from lon/lat and the frame on reading
        names.append(name)
        attrs = {"description": column.info.description or ""}
        unit = getattr(column, "unit", None)
        if unit is not None:
            attrs["units"] = unit.to_string()
        values = column.value if isinstance(column, u.Quantity) else np.asarray(column)
        columns[name] = ("source", np.asarray(values), attrs)
    ds = xr.Dataset(columns, attrs={"meta": _json_meta(table.meta), "columns": names})
    ds.to_zarr(
        str(path),
        group=CATALOG_GROUP,
        mode="w-",
        consolidated=False,
        zarr_format=3,
        encoding=checksummed({}, ds.variables),
        **WRITE_OPTIONS,
    )
    seal_group(path, CATALOG_GROUP, {})


def read_store_catalog(path: str | os.PathLike[str]) -> QTable | None:
    """The catalog kept in the run store at ``path`` as a `QTable` (columns with their units,
    ``sky_centroid`` rebuilt from ``lon``/``lat`` in ``meta["FRAME"]``), or None when it has
    none (complete)."""
    path = Path(path).expanduser()
    if not is_complete(open_group(path, CATALOG_GROUP)):
        return None
    digest = check_group(path, CATALOG_GROUP, full=True)  # small: every chunk checked
    ds = open_pinned(path, CATALOG_GROUP, digest).load()
    table = QTable(meta=ds.attrs.get("meta", {}))
    for name in ds.attrs["columns"]:
        var = ds[name]
        values = var.values
        if "units" in var.attrs:
            values = u.Quantity(values, var.attrs["units"], dtype=values.dtype)
        table[name] = values
        table[name].info.description = var.attrs.get("description") or None
        if name == "dec" and {"lon", "lat"} <= set(table.colnames):
            lon, lat = table["lon"], table["lat"]
            table["sky_centroid"] = SkyCoord(
                u.Quantity(lon, u.deg),
                u.Quantity(lat, u.deg),
                frame=table.meta.get("FRAME", "galactic"),
            )
    return table


def catalog_of_result(
    path: str | os.PathLike[str],
    *,
    exposure_maps: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> tuple[Table, bool]:
    """`cwtflow.find_sources` on the result stored at ``path``, with the policy of
    ``cwtflow catalog``.

    Parameters
    ----------
    path : path
        A run's zarr store (``.zarr``, its final state) or a FITS state (`write_state`).
    exposure_maps : path, optional
        FITS maps whose EXPOSURE HDU gives the fluxes; without it, a store's own stored
        exposure (if any) is used.
    overwrite : bool
        A store that already holds a catalog is refused unless this is set.
    **options
        Keyword arguments of `cwtflow.find_sources` (not ``exposure``).

    Returns
    -------
    (table, in_store) : the catalog, and whether ``path`` is a store (where the caller may
    keep it with `write_store_catalog`).
    """
    path = Path(path).expanduser()
    exposure = None
    in_store = is_store(path)
    if in_store:
        history = open_history(path)
        if read_store_catalog(path) is not None and not overwrite:
            raise StoreError(f"{path} already holds a catalog (use --overwrite to replace it)")
        state = history.final
        exposure = history.inputs["exposure"] if "exposure" in history.inputs else None
    else:
        state = read_state(path)
    if exposure_maps is not None:
        data = read_maps(exposure_maps)
        if "exposure" not in data:
            raise InputError(f"{exposure_maps} has no EXPOSURE HDU")
        exposure = data["exposure"]
    return find_sources(state, exposure=exposure, **options), in_store
