"""A source catalog kept in a run's zarr store, next to its history (group ``catalog``).

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
import zarr
from astropy.table import Table

from .errors import StoreError
from .history import COMPLETE, _delete_group, _is_complete, _open_group, open_history

__all__ = ["CATALOG_GROUP", "read_store_catalog", "write_store_catalog"]

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
    if _is_complete(_open_group(path, CATALOG_GROUP)) and not overwrite:
        raise StoreError(f"{path} already holds a catalog (use overwrite to replace it)")
    _delete_group(path, CATALOG_GROUP)
    columns = {}
    for name in table.colnames:
        column = table[name]
        attrs = {"description": column.description or ""}
        if column.unit is not None:
            attrs["units"] = column.unit.to_string()
        columns[name] = ("source", np.asarray(column), attrs)
    ds = xr.Dataset(columns, attrs={"meta": _json_meta(table.meta), "columns": table.colnames})
    ds.to_zarr(str(path), group=CATALOG_GROUP, mode="w-", consolidated=False, zarr_format=3)
    group = zarr.open_group(str(path), path=CATALOG_GROUP, mode="r+")
    group.attrs.update({COMPLETE: True})


def read_store_catalog(path: str | os.PathLike[str]) -> Table | None:
    """The catalog kept in the run store at ``path``, or None when it has none (complete)."""
    path = Path(path).expanduser()
    if not _is_complete(_open_group(path, CATALOG_GROUP)):
        return None
    ds = xr.open_zarr(str(path), group=CATALOG_GROUP, consolidated=False).load()
    table = Table(meta=ds.attrs.get("meta", {}))
    for name in ds.attrs["columns"]:
        var = ds[name]
        table[name] = var.values
        table[name].description = var.attrs.get("description") or None
        if "units" in var.attrs:
            table[name].unit = var.attrs["units"]
    return table
