"""What plain zarr and xarray readers of a run's store get beyond cwtflow's own layout
(`cwtflow.store`): consolidated metadata, and sky coordinates on each iteration group.

- `consolidate` writes the store's consolidated metadata, so that ``xr.open_zarr(path)`` and
  ``xr.open_zarr(path, group="iterations/0001")`` open without a warning. The writer calls it
  where the store is complete (after iteration 0, after each completed iteration, after a
  resume's clean-up; the CLI after a catalog or provenance). A kill between two such points
  leaves it stale; cwtflow's readers never trust it (they open groups with
  ``consolidated=False`` and read the completion markers of each group itself).
- `axis_coords`: 1-D ``lon`` (on x) and ``lat`` (on y) for a grid where they are separable;
  each iteration group also carries the WCS cards in its attrs (``wcs``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import xarray as xr
import zarr

from .maps import wcs_from_attrs

__all__ = ["axis_coords", "consolidate"]


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write the consolidated metadata of the store at ``path`` (for ``xr.open_zarr``), at a
    point where the store is complete. cwtflow's own readers never use it (they open with
    ``consolidated=False``), so a copy left stale by a kill does no harm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of zarr v3 spec"
        zarr.consolidate_metadata(str(path))


def axis_coords(attrs: dict[str, Any], shape: tuple[int, int]) -> dict[str, xr.Variable]:
    """1-D ``lon`` (on x) and ``lat`` (on y) of a grid where they are separable (CAR without
    rotation: every row has the same longitudes, every column the same latitudes); else {}."""
    wcs = wcs_from_attrs(attrs)
    ny, nx = shape
    if not wcs.wcs.ctype[0].upper().endswith("-CAR") or wcs.wcs.has_cd():
        return {}
    if wcs.wcs.get_pc()[0, 1] != 0 or wcs.wcs.get_pc()[1, 0] != 0:
        return {}
    x, y = np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64)
    rows = [wcs.wcs_pix2world(x, np.full(nx, r), 0) for r in (0, ny - 1)]
    cols = [wcs.wcs_pix2world(np.full(ny, c), y, 0) for c in (0, nx - 1)]
    if not (np.array_equal(rows[0][0], rows[1][0]) and np.array_equal(cols[0][1], cols[1][1])):
        return {}
    return {
        "lon": xr.Variable("x", rows[0][0], {"units": "deg", "long_name": "pixel longitude"}),
        "lat": xr.Variable("y", cols[0][1], {"units": "deg", "long_name": "pixel latitude"}),
    }
