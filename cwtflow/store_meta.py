"""What plain zarr and xarray readers of a run's store get beyond cwtflow's own layout
(`cwtflow.store`): consolidated metadata, and sky coordinates on each iteration group.

- `consolidate` writes the store's consolidated metadata, so that ``xr.open_zarr(path)`` and
  ``xr.open_zarr(path, group="iterations/0001")`` open without a warning. The writer calls it
  where the store is complete (after iteration 0, after each completed iteration, after a
  resume's clean-up; the CLI after a catalog or provenance). A kill between two such points
  leaves it stale; cwtflow's readers never trust it (they open groups with
  ``consolidated=False`` and read the completion markers of each group itself).
- each iteration group carries the map's sky coordinates as the inputs do
  (`cwtflow.maps.grid_coords`: 1-D ``lon``/``lat`` on a separable grid) and the WCS cards in
  its attrs (``wcs``).
"""

from __future__ import annotations

import os
import warnings

import zarr

__all__ = ["consolidate"]


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write the consolidated metadata of the store at ``path`` (for ``xr.open_zarr``), at a
    point where the store is complete. cwtflow's own readers never use it (they open with
    ``consolidated=False``), so a copy left stale by a kill does no harm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of zarr v3 spec"
        zarr.consolidate_metadata(str(path))
