"""One iteration of a run's zarr store computed and written tile by tile: one task per tile.

`cwtflow.store_writer.ZarrSink.write_tiles` creates the group of iteration ``k`` (metadata
only), then `compute_tiles` runs one task per tile (`store_tile`) that

1. reads its windows of the inputs and of iteration ``k - 1`` from the store
   (`cwtflow.halo.window`: the halo, zeros beyond the map, periodic in x on an all-sky map),
2. runs the iteration on them (`cwtflow.tiled.TileWork`, the same functions as the graph
   path of `cwtflow.tiled.TiledStep`, so both give the same numbers),
3. writes its chunks of every variable of group ``k`` (the tiles are unions of zarr chunks: no
   two tasks write one chunk; ``approx_bkg`` is constant and carried over), and returns the
   four residual moments of the tile.

The store is the halo exchange: the graph holds one task per tile and nothing else, no array
travels between tasks or back to the driver, and a worker's memory holds the tiles it is
computing, whatever the size of the map. Tasks run wherever dask runs them (threads, or the
workers of a cluster sharing the store's file system).
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import zarr

from .halo import window
from .tiled import TileWork

__all__ = ["compute_tiles", "store_tile"]


def compute_tiles(path: str, previous: str, group: str, work: TileWork) -> np.ndarray:
    """Compute and write every tile of group ``group`` from group ``previous``; the residual
    moments per tile, (n_tiles_y, n_tiles_x, 4)."""
    edges = [np.cumsum([0, *axis]).tolist() for axis in work.chunks]
    shape = (len(work.chunks[0]), len(work.chunks[1]))
    tasks = [
        dask.delayed(store_tile, pure=False)(
            path,
            previous,
            group,
            (slice(edges[0][i], edges[0][i + 1]), slice(edges[1][j], edges[1][j + 1])),
            (i, j),
            work,
            dask_key_name=f"store-tile-{dask.base.tokenize(path, group, work)}-{i}-{j}",
        )
        for i, j in np.ndindex(*shape)
    ]
    (values,) = dask.compute(tasks)
    return np.array(values, dtype=np.float64).reshape(*shape, -1)


def store_tile(
    path: str,
    previous: str,
    group: str,
    tile: tuple[slice, slice],
    block_id: tuple[int, int],
    work: TileWork,
) -> np.ndarray:
    """One tile (rows and columns ``tile``, index ``block_id``): read its windows from the
    store, run ``work``, write its chunks of group ``group``; returns its residual moments."""

    def array(where: str, name: str, mode: str = "r") -> Any:
        return zarr.open_array(store=path, path=f"{where}/{name}", mode=mode)

    windows = [
        window(array(where, name), *tile, work.depth, work.wrap)
        for where, name in (
            ("inputs", "counts"),
            ("inputs", "background"),
            (previous, "model"),
            (previous, "approx"),
        )
    ]
    support = array(previous, "support")[(slice(None), *tile)]
    arrays, moments = work(*windows, support, block_id)
    if "approx_bkg" not in arrays:  # constant: carried over from the previous group
        arrays["approx_bkg"] = array(previous, "approx_bkg")[tile]
    for name, values in arrays.items():
        out = array(group, name, "r+").with_config({"write_empty_chunks": True})
        out[(Ellipsis, *tile)] = values
    return np.asarray(moments, dtype=np.float64)
