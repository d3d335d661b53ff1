"""Halo exchange on dask arrays: a function per block of 2-D images, each block with the
pixels of its neighbours around it, equivalent to `dask.array.map_overlap` (tested against
`dask.array.overlap`). It knows nothing of the CWT.

Why not `dask.array.overlap`: that builds a halo-sized copy of every tile as its own task,
which waits in memory until the tile's function runs, and views of a block in its neighbours'
tiles keep the whole block alive. Here a block's neighbours receive small copies of its edges
(`pieces`, one task per block), and one task per tile assembles its own halo and runs the
function at once (`overlapped_tiles`): no halo-sized intermediate waits between tasks, and dask's
ordering sees one task per tile consuming the inputs.

Where the arrays are already stored (a run's zarr store), `window` reads the same tile by
slicing the stored array: a task reads its own tile and halo, and no pieces travel at all
(`cwtflow.store_tiles`).

Boundaries: zeros beyond the map, or periodic along x (all-sky longitude). An axis of depth 0
gets no halo. Dask's overlap reads the halo from the neighbouring block only, and so does this:
every block of an axis cut in several must hold ``depth`` pixels (`tile_chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.utils import apply, funcname

__all__ = [
    "assemble",
    "halo_graph",
    "overlapped_tiles",
    "pieces",
    "run_tile",
    "tile_chunks",
    "window",
]


def tile_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Chunk sizes along one axis merged with their neighbours until each is at least ``depth``.

    Dask's overlap reads the halo from the neighbouring chunk only, so every chunk of an axis
    cut in several must hold ``depth`` pixels. The boundaries kept are a subset of the input's,
    so results rechunk back cheaply. An axis shorter than ``depth`` becomes one chunk.
    """
    merged: list[int] = []
    run = 0
    for size in chunks:
        run += size
        if run >= depth:
            merged.append(run)
            run = 0
    if run:
        if merged:
            merged[-1] += run
        else:
            merged.append(run)
    return tuple(merged)


def pieces(block: np.ndarray, depth: tuple[int, int]) -> dict[tuple[int, int], np.ndarray]:
    """Copies of the edges of one block that its neighbours need as halo.

    Key ``(sy, sx)``: the piece read by the tile at ``-(sy, sx)`` blocks from this one (rows
    ``-dy:`` for ``sy = -1``, ``:dy`` for ``+1``, all for 0; columns alike). Copies, not views,
    so that the block itself is released as soon as its own tile has run.
    """
    dy, dx = depth
    ny, nx = block.shape
    rows = {-1: slice(ny - dy, ny), 0: slice(None), 1: slice(0, dy)}
    cols = {-1: slice(nx - dx, nx), 0: slice(None), 1: slice(0, dx)}
    return {
        (sy, sx): np.array(block[rows[sy], cols[sx]])
        for sy in ((-1, 0, 1) if dy else (0,))
        for sx in ((-1, 0, 1) if dx else (0,))
        if (sy, sx) != (0, 0)
    }


def assemble(
    block: np.ndarray,
    neighbours: list[list[dict[tuple[int, int], np.ndarray] | None]],
    depth: tuple[int, int],
) -> np.ndarray:
    """One block with its halo from the neighbours' pieces (None: zeros beyond the map)."""
    dy, dx = depth
    ny, nx = block.shape
    sys_ = (-1, 0, 1) if dy else (0,)
    sxs = (-1, 0, 1) if dx else (0,)
    size = {-1: (dy, dx), 0: (ny, nx), 1: (dy, dx)}
    rows = []
    for a, sy in enumerate(sys_):
        row = []
        for b, sx in enumerate(sxs):
            if (sy, sx) == (0, 0):
                row.append(block)
                continue
            edges = neighbours[a][b]
            if edges is None:
                row.append(np.zeros((size[sy][0], size[sx][1]), dtype=block.dtype))
            else:
                row.append(edges[(sy, sx)])
        rows.append(row)
    return np.block(rows)


def halo_graph(
    image: da.Array, depth: tuple[int, int], periodic_x: bool
) -> tuple[dict[Any, Any], dict[tuple[int, int], tuple[Any, list[list[Any]]]]]:
    """The halo exchange of a 2-D ``image``: its pieces tasks and, per block, what to assemble
    (the same tiles as `dask.array.overlap`, zeros beyond the map or periodic in x).

    Returns ``(dsk, sources)``: ``dsk`` holds one `pieces` task per block; ``sources[i, j]``
    is ``(block key, neighbours)`` with ``neighbours`` the 3 x 3 (or 1 x 3, 3 x 1) grid of
    `assemble`'s argument as task keys (None beyond the map; periodic in x with
    ``periodic_x``). An axis of depth 0 gets no halo.
    """
    dy, dx = depth
    pieces_name = f"halo-pieces-{tokenize(image, dy, dx, periodic_x)}"
    nby, nbx = image.numblocks
    dsk: dict[Any, Any] = {}
    sources: dict[tuple[int, int], tuple[Any, list[list[Any]]]] = {}
    for i, j in np.ndindex(nby, nbx):
        dsk[(pieces_name, i, j)] = (pieces, (image.name, i, j), depth)
    for i, j in np.ndindex(nby, nbx):
        neighbours = []
        for sy in (-1, 0, 1) if dy else (0,):
            row = []
            for sx in (-1, 0, 1) if dx else (0,):
                ii, jj = i + sy, j + sx
                if periodic_x:
                    jj %= nbx
                inside = 0 <= ii < nby and 0 <= jj < nbx
                row.append((pieces_name, ii, jj) if inside and (sy, sx) != (0, 0) else None)
            neighbours.append(row)
        sources[(i, j)] = ((image.name, i, j), neighbours)
    return dsk, sources


def run_tile(
    func: Any, blocks: list[Any], neighbours: list[Any], depth: tuple[int, int], **kwargs: Any
) -> np.ndarray:
    """``func`` on the tiles (block plus halo) assembled from each image's block and pieces."""
    tiles = [assemble(b, n, depth) for b, n in zip(blocks, neighbours, strict=True)]
    return func(*tiles, **kwargs)


def overlapped_tiles(
    func: Any,
    images: Sequence[da.Array],
    depth: tuple[int, int],
    periodic_x: bool,
    *,
    planes: int | None,
    block_id: bool = False,
    result_dtype: Any = np.float64,
    **kwargs: Any,
) -> da.Array:
    """``func(*tiles, **kwargs)`` per block of ``images`` (same chunks), each tile with its halo.

    One task per tile, which assembles the tiles from the block and its neighbours' pieces
    itself: no tile-sized intermediate waits in memory between tasks, and dask's ordering sees
    one task per tile consuming the inputs. ``func`` returns a (``planes``, ty, tx) array (or
    (ty, tx) with ``planes=None``) of the tile interiors; with ``block_id`` it also receives
    ``block_id=(0, i, j)`` (or ``(i, j)``); its result has ``result_dtype``.
    """
    graphs = [halo_graph(image, depth, periodic_x) for image in images]
    dsk: dict[Any, Any] = {}
    for part, _ in graphs:
        dsk.update(part)
    name = (
        f"{funcname(func).strip('_')}-{tokenize(func, *images, depth, periodic_x, planes, kwargs)}"
    )
    first = images[0]
    for i, j in np.ndindex(*first.numblocks):
        blocks = [sources[(i, j)][0] for _, sources in graphs]
        neighbours = [sources[(i, j)][1] for _, sources in graphs]
        extra = dict(kwargs)
        if block_id:
            extra["block_id"] = (i, j) if planes is None else (0, i, j)
        task = (apply, run_tile, [func, blocks, neighbours, depth], extra)
        dsk[(name, i, j) if planes is None else (name, 0, i, j)] = task
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=list(images))
    if planes is None:
        chunks, meta = first.chunks, np.empty((0, 0))
    else:
        chunks, meta = ((planes,), *first.chunks), np.empty((0, 0, 0))
    return da.Array(graph, name, chunks, dtype=result_dtype, meta=meta.astype(result_dtype))


def window(
    array: Any, ys: slice, xs: slice, depth: tuple[int, int], periodic_x: bool
) -> np.ndarray:
    """Rows ``ys`` and columns ``xs`` of a 2-D ``array`` with ``depth`` pixels around them,
    read by slicing (a numpy or zarr array): the tile `overlapped_tiles` assembles for that
    block (zeros beyond the map, periodic along x with ``periodic_x``).

    For arrays already stored: a tile task reads its own window and no halo pieces travel
    between tasks. Like `dask.array.overlap`, every block of an axis cut in several must hold
    ``depth`` pixels (`tile_chunks`); the window is then the same tile.
    """
    dy, dx = depth
    ny, nx = array.shape
    y0, y1, x0, x1 = ys.start - dy, ys.stop + dy, xs.start - dx, xs.stop + dx
    out = np.zeros((y1 - y0, x1 - x0), dtype=array.dtype)
    rows = slice(max(y0, 0), min(y1, ny))
    if rows.start >= rows.stop:
        return out
    # (first column of the map, first column of the window, width) of each contiguous read
    reads = [(max(x0, 0), max(x0, 0) - x0, min(x1, nx) - max(x0, 0))]
    if periodic_x:
        if x0 < 0:
            reads.append((x0 + nx, 0, -x0))
        if x1 > nx:
            reads.append((0, nx - x0, x1 - nx))
    for first, at, width in reads:
        if width > 0:
            out[rows.start - y0 : rows.stop - y0, at : at + width] = array[
                rows, first : first + width
            ]
    return out
