"""One iteration of a run's zarr store computed and written tile by tile: one task per tile
(an island threshold adds a labelling pass and one join).

`cwtflow.store_writer.ZarrSink.write_tiles` creates the group of iteration ``k`` (metadata
only: the previous group's, `cwtflow.store.copy_layout`), then `compute_tiles` runs one task
per tile (`store_tile`) that

1. reads its windows of the inputs and of iteration ``k - 1`` from the store
   (`cwtflow.halo.window`: the halo, zeros beyond the map, periodic in x on an all-sky map),
2. runs the iteration on them (`cwtflow.tiled.TileWork`, the same functions as the graph
   path of `cwtflow.tiled.TiledStep`, so both give the same numbers),
3. writes its chunks of every variable of group ``k`` (the tiles are unions of zarr chunks: no
   two tasks write one chunk; ``approx_bkg``, constant after the first iteration, is the
   previous group's files, linked with the layout), and returns the
   four residual moments of the tile.

The store is the halo exchange: the graph holds one task per tile and nothing else, no array
travels between tasks or back to the driver, and a worker's memory holds the tiles it is
computing, whatever the size of the map.

When the tasks run in this process (dask's threaded or synchronous scheduler), a tile's final
write is handed to the iteration's writer thread (`cwtflow.background.BackgroundWriter`, at
most `BEHIND_TILES` tiles waiting) and the task returns: the next tile computes while it is
written, and `compute_tiles` waits for every write (raising a failed one's error) before it
returns, so an iteration is on disk before its group is sealed. A worker process of a cluster
writes in its task: a write that outlived its task could die with the worker after the
scheduler saw the task done.

An island threshold keeps a component only if its maximum significance reaches it, and a
component may cross tiles: then each tile first computes its uncleaned planes and labels its
significant pixels (`tile_components`, `cwtflow.labels.tile_labels`), writes the variables
the cleaning does not change (T, E, A), and keeps the labels (one int32 plane per scale) on
its worker, returning a report of their borders, sizes and maxima; one task joins the reports
(`cwtflow.labels.keep_table`: never a map); the tile's `store_tile` then takes its kept
pixels (`cwtflow.labels.tile_kept`) and writes as above. Four tasks per tile (two of them
dask's getitems) and one per iteration; the labels cross between workers only where dask
runs the two tasks of a tile apart. Tasks run wherever dask runs them (threads, or the
workers of a cluster sharing the store's file system).

A window touches its tile's chunk and the eight around it, and zarr decodes whole chunks: read
naively, every chunk of the four windowed maps would be decoded by nine tasks (measured: 0.09
s of a 0.2 s task, 512-pixel tiles). Each process therefore keeps the chunks it decoded in a
small LRU cache (`ChunkCache`, `CACHE_BYTES`), shared by its threads, so neighbouring tiles
computed by one process decode a chunk once. Its keys hold the digest of the complete group
the chunk belongs to (`cwtflow.store_integrity.group_digest`: it covers every chunk's CRC), so
a cached chunk can never stand for other data, even when a store is rewritten in place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import dask
import numpy as np

from .background import BackgroundWriter
from .halo import window
from .labels import keep_table, tile_kept, tile_labels
from .store import open_array, write_region
from .tiled import TileWork

__all__ = [
    "BEHIND_TILES",
    "CACHE",
    "CACHE_BYTES",
    "CachedArray",
    "ChunkCache",
    "compute_tiles",
    "store_tile",
    "tile_components",
]

#: Bytes of decoded chunks each process keeps for the windows of its tile tasks.
CACHE_BYTES = 256 * 2**20
#: Tiles whose write may wait behind their task in a local run (`compute_tiles`).
BEHIND_TILES = 2


class ChunkCache:
    """Decoded chunks of stored 2-D arrays, least recently used dropped beyond ``nbytes``;
    thread-safe (one per process, `CACHE`)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._blocks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], load: Any) -> np.ndarray:
        """The block of ``key``, from the cache or ``load()`` (then kept)."""
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        block = load()
        block.flags.writeable = False
        with self._lock:
            if key not in self._blocks and block.nbytes <= self.nbytes:
                self._blocks[key] = block
                self._size += block.nbytes
                while self._size > self.nbytes:
                    _, old = self._blocks.popitem(last=False)
                    self._size -= old.nbytes
        return block

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._size = 0


#: The process's cache of decoded chunks.
CACHE = ChunkCache(CACHE_BYTES)


class CachedArray:
    """A stored 2-D zarr array read by (rows, columns) slices through `CACHE`, chunk by chunk;
    ``key`` names the array and the digest of its complete group."""

    def __init__(self, array: Any, key: tuple[str, ...]) -> None:
        self.array, self.key = array, key
        self.shape, self.dtype = array.shape, array.dtype
        self.chunks = array.chunks

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        (cy, cx), (ny, nx) = self.chunks, self.shape
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), dtype=self.dtype)
        for iy in range(rows.start // cy, (rows.stop - 1) // cy + 1):
            for ix in range(cols.start // cx, (cols.stop - 1) // cx + 1):
                y0, x0 = iy * cy, ix * cx
                block = CACHE.get(
                    (*self.key, iy, ix),
                    lambda y0=y0, x0=x0: self.array[y0 : min(y0 + cy, ny), x0 : min(x0 + cx, nx)],
                )
                ya, yb = max(rows.start, y0), min(rows.stop, y0 + cy)
                xa, xb = max(cols.start, x0), min(cols.stop, x0 + cx)
                out[ya - rows.start : yb - rows.start, xa - cols.start : xb - cols.start] = block[
                    ya - y0 : yb - y0, xa - x0 : xb - x0
                ]
        return out


def compute_tiles(
    path: str, previous: str, group: str, work: TileWork, digests: dict[str, str]
) -> np.ndarray:
    """Compute and write every tile of group ``group`` from group ``previous``; the residual
    moments per tile, (n_tiles_y, n_tiles_x, 4). ``digests``: the digests of the complete
    groups read (``inputs`` and ``previous``), the cache's keys.

    With an island threshold each tile takes two tasks around one join: `tile_components`
    (writes T, E, A; its labels stay on the worker, their report goes to the join),
    `cwtflow.labels.keep_table` on the reports alone, then `store_tile` with the tile's kept
    pixels. Tasks running in this process write behind themselves (a
    `cwtflow.background.BackgroundWriter` per call)."""
    # the scheduler dask.compute would use for delayed tasks: this process's threads, or not
    here = dask.base.get_scheduler(collections=[dask.delayed(None)])
    local = here in (dask.threaded.get, dask.local.get_sync)
    writer = BackgroundWriter(BEHIND_TILES, "cwtflow-tiles") if local else None
    edges = [np.cumsum([0, *axis]).tolist() for axis in work.chunks]
    shape = (len(work.chunks[0]), len(work.chunks[1]))
    token = dask.base.tokenize(path, group, work)

    def tile(i: int, j: int) -> tuple[slice, slice]:
        return slice(edges[0][i], edges[0][i + 1]), slice(edges[1][j], edges[1][j + 1])

    common = (path, previous, group)
    joined: dict[tuple[int, int], Any] = {}
    table = None
    if not work.cleaning.local:
        for i, j in np.ndindex(*shape):
            joined[i, j] = dask.delayed(tile_components, pure=False, nout=2)(
                *common, tile(i, j), work, digests, dask_key_name=f"tile-labels-{token}-{i}-{j}"
            )
        table = dask.delayed(keep_table, pure=False)(
            [[joined[i, j][1] for j in range(shape[1])] for i in range(shape[0])],
            work.cleaning,
            wrap_x=work.wrap,
            dask_key_name=f"tile-join-{token}",
        )
    tasks = [
        dask.delayed(store_tile, pure=False)(
            *common,
            tile(i, j),
            (i, j),
            work,
            digests,
            None if table is None else (joined[i, j][0], table),
            writer=writer,
            dask_key_name=f"store-tile-{token}-{i}-{j}",
        )
        for i, j in np.ndindex(*shape)
    ]
    try:
        (values,) = dask.compute(tasks)
    finally:
        if writer is not None:
            writer.close()  # every tile on disk (or the first failed write's error)
    return np.array(values, dtype=np.float64).reshape(*shape, -1)


def _windows(
    path: str, previous: str, tile: tuple[slice, slice], work: TileWork, digests: dict[str, str]
) -> list[np.ndarray]:
    """The tile's windows of counts, background, model and approx (through `CACHE`)."""
    return [
        window(
            CachedArray(_open(path, where, name), (path, where, digests[where], name)),
            *tile,
            work.depth,
            work.wrap,
        )
        for where, name in (
            ("inputs", "counts"),
            ("inputs", "background"),
            (previous, "model"),
            (previous, "approx"),
        )
    ]


def tile_components(
    path: str,
    previous: str,
    group: str,
    tile: tuple[slice, slice],
    work: TileWork,
    digests: dict[str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """First pass of a tile with an island threshold: writes the variables the cleaning does
    not change (`TileWork.plane_arrays`) and returns the labels of the tile's significant
    pixels and their report (`cwtflow.labels.tile_labels`)."""
    counts, background, model, approx = _windows(path, previous, tile, work, digests)
    planes = work.planes(counts, background, model, approx)
    n = work.n_scale
    local, report = tile_labels(planes[2 * n : 3 * n], work.cleaning.threshold)
    write_region(path, group, tile, work.plane_arrays(planes, background))
    return local, report


def store_tile(
    path: str,
    previous: str,
    group: str,
    tile: tuple[slice, slice],
    block_id: tuple[int, int],
    work: TileWork,
    digests: dict[str, str],
    joined: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    writer: BackgroundWriter | None = None,
) -> np.ndarray:
    """One tile (rows and columns ``tile``, index ``block_id``): read its windows from the
    store, run ``work``, write its chunks of group ``group`` (by ``writer``, after the task,
    when given); returns its residual moments. With an island threshold ``joined`` holds the
    tile's labels (`tile_components`, which wrote the rest of the tile) and the table of kept
    components (`cwtflow.labels.keep_table`)."""
    support = _open(path, previous, "support")[(slice(None), *tile)]
    if joined is None:
        arrays, moments = work(*_windows(path, previous, tile, work, digests), support, block_id)
    else:
        local, table = joined
        kept = tile_kept(local, table, len(work.chunks[1]), block_id)
        transform = _open(path, group, "transform_3d")[(slice(None), *tile)]
        approx = _open(path, group, "approx")[tile]
        model = _open(path, previous, "model")[tile]
        counts = _open(path, "inputs", "counts")[tile]
        arrays, moments = work.finish(transform, approx, kept, model, support, counts)
    if writer is not None:
        writer.submit(write_region, path, group, tile, arrays)
    else:
        write_region(path, group, tile, arrays)
    return np.asarray(moments, dtype=np.float64)


def _open(path: str, where: str, name: str) -> Any:
    return open_array(path, f"{where}/{name}")
