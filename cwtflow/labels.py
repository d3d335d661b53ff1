"""Support cleaning on dask arrays: connected components that cross tile borders.

Orchestration only: dask graphs around `cwtflow.core.label` and numpy per block. Which
components survive is decided by `cwtflow.core.component_keep`, the rule of the whole-map path
(`cwtflow.core.clean_mask`), and each block is labelled by `cwtflow.core.label`, so both give
identical masks for any chunking. Public utilities: `label_components` (global labels and
per-component statistics of any dask mask) and `clean_support` (the tiled cleaning).

Arrays are images ``(y, x)`` or cubes ``(scale, y, x)``; components are 4-connected within each
``(y, x)`` plane and never join two planes. With ``wrap_x`` the last axis is periodic (all-sky
longitude): the first and last pixel of a row are neighbours.

How components are joined across tiles (the graph is linear in the number of tiles):

1. every block is labelled on its own (one `map_blocks` layer of `cwtflow.core.label`);
2. every block reports, in one pass, its label count, the labels on its four borders, and each
   label's pixel count (`numpy.bincount`) and maximum value (`numpy.maximum.at`, when values
   such as the significance are given);
3. one task reads the reports (borders and per-label vectors, never the map), numbers the block
   labels globally, joins labels that touch across a tile border (or the seam) with
   `scipy.sparse.csgraph.connected_components` and reduces the per-label statistics;
4. a blockwise lookup maps the result back onto each block (final labels, or kept pixels).

The number of components is unknown while the graph is built; it only exists inside the task of
step 3, whose result is a 0-d dask array of object dtype that step 4 takes as a (broadcast)
argument. Everything stays one array graph (no `dask.delayed` wrapping an array), so a
computation that asks for labels, statistics and cleaned masks together labels each tile once.
"""

from __future__ import annotations

from typing import NamedTuple

import dask.array as da
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import core
from .errors import InputError

__all__ = ["clean_support", "keep_table", "label_components", "tile_kept", "tile_labels"]


class _Report(NamedTuple):
    """What one block tells the joining task (small: borders and per-label vectors)."""

    n: int
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    sizes: np.ndarray
    maxima: np.ndarray


class _Joined(NamedTuple):
    """Result of the joining task.

    ``offsets[b]`` is the number of block labels before block ``b`` (C order over the (y, x)
    block grid, one extra entry for the total); block ``b``'s label ``l > 0`` is global block
    label ``offsets[b] + l``, and ``mapping`` sends global block labels (0 = background) to final
    component labels ``1..K``. ``sizes``/``maxima`` are indexed by final label.
    """

    offsets: np.ndarray
    mapping: np.ndarray
    sizes: np.ndarray
    maxima: np.ndarray


def _as_planes(array: da.Array | np.ndarray, name: str) -> da.Array:
    """``array`` as a dask image or cube whose scale axis (if any) is one chunk."""
    array = da.asarray(array)
    if array.ndim not in (2, 3):
        raise InputError(
            f"{name} must be an image (y, x) or a cube (scale, y, x), got {array.ndim} dims"
        )
    if array.ndim == 3 and array.numblocks[0] != 1:
        array = array.rechunk({0: -1})
    return array


def _as_mask(mask: da.Array | np.ndarray) -> da.Array:
    mask = _as_planes(mask, "mask")
    if mask.dtype != bool:
        raise InputError(f"mask must be boolean, got dtype {mask.dtype}")
    return mask


def _label_block(mask: np.ndarray) -> np.ndarray:
    return core.label(mask)[0]


def _block_report(labels: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """One block's `_Report`, wrapped in a one-element object array (one per block)."""
    n = int(labels.max()) if labels.size else 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    maxima = np.full(n + 1, -np.inf)
    if values is not None:
        inside = labels != 0
        np.maximum.at(maxima, labels[inside], values[inside])
    report = _Report(
        n,
        np.ascontiguousarray(labels[..., 0, :]),
        np.ascontiguousarray(labels[..., -1, :]),
        np.ascontiguousarray(labels[..., :, 0]),
        np.ascontiguousarray(labels[..., :, -1]),
        sizes,
        maxima,
    )
    out = np.empty((1,) * labels.ndim, dtype=object)
    out[(0,) * labels.ndim] = report
    return out


def _touching(
    a: np.ndarray, b: np.ndarray, offset_a: int, offset_b: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global label pairs facing each other on two adjacent borders."""
    both = (a != 0) & (b != 0)
    return a[both].astype(np.intp) + offset_a, b[both].astype(np.intp) + offset_b


def _wrapped(value: object) -> np.ndarray:
    """``value`` as a 0-d object array (the block of a 0-d dask array)."""
    out = np.empty((), dtype=object)
    out[()] = value
    return out


def _join(reports: np.ndarray, *, wrap_x: bool) -> np.ndarray:
    """Number block labels globally and join those touching across tile borders (one task).

    ``reports`` is the object array of every block's `_Report`; returns a 0-d `_Joined`.
    """
    grid = reports.reshape(reports.shape[-2:])
    nby, nbx = grid.shape
    counts = np.array([grid[idx].n for idx in np.ndindex(grid.shape)], dtype=np.intp)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])

    def offset(i: int, j: int) -> int:
        return int(offsets[i * nbx + j])

    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    for i, j in np.ndindex(grid.shape):
        here = grid[i, j]
        if i + 1 < nby:
            pair = _touching(here.bottom, grid[i + 1, j].top, offset(i, j), offset(i + 1, j))
            src.append(pair[0])
            dst.append(pair[1])
        if j + 1 < nbx or wrap_x:
            jn = (j + 1) % nbx
            pair = _touching(here.right, grid[i, jn].left, offset(i, j), offset(i, jn))
            src.append(pair[0])
            dst.append(pair[1])
    rows = np.concatenate(src) if src else np.empty(0, dtype=np.intp)
    cols = np.concatenate(dst) if dst else np.empty(0, dtype=np.intp)
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(total + 1,) * 2)
    _, component = connected_components(graph, directed=False)
    # renumber so that the background stays 0 and components are 1..K in block order
    _, final = np.unique(component[1:], return_inverse=True)
    mapping = np.concatenate([[0], final.astype(np.intp) + 1])
    n_final = int(final.max()) + 1 if final.size else 0

    blocks = [grid[idx] for idx in np.ndindex(grid.shape)]
    sizes = np.zeros(n_final + 1, dtype=np.int64)
    np.add.at(sizes, mapping[1:], np.concatenate([r.sizes[1:] for r in blocks]))
    maxima = np.full(n_final + 1, -np.inf)
    np.maximum.at(maxima, mapping[1:], np.concatenate([r.maxima[1:] for r in blocks]))
    return _wrapped(_Joined(offsets, mapping, sizes, maxima))


def _components(
    mask: da.Array, values: da.Array | None, *, wrap_x: bool
) -> tuple[da.Array, da.Array]:
    """Block-local labels and the 0-d `_Joined` of ``mask`` (see the module docstring)."""
    local = da.map_blocks(
        _label_block, mask, dtype=np.int32, meta=np.empty((0,) * mask.ndim, dtype=np.int32)
    )
    args = [local] if values is None else [local, values.rechunk(mask.chunks)]
    reports = da.map_blocks(
        _block_report,
        *args,
        chunks=tuple((1,) * n for n in mask.numblocks),
        dtype=object,
        meta=np.empty((0,) * mask.ndim, dtype=object),
    )
    index = "syx"[-mask.ndim :]
    joined = da.blockwise(
        _join,
        "",
        reports,
        index,
        concatenate=True,
        wrap_x=bool(wrap_x),
        dtype=object,
        meta=np.empty((), dtype=object),
    )
    return local, joined


def _block_index(block_id: tuple[int, ...], n_bx: int) -> int:
    """Position of a block in the C-ordered (y, x) block grid."""
    return block_id[-2] * n_bx + block_id[-1]


def _relabel_block(
    local: np.ndarray, joined: np.ndarray, *, n_bx: int, block_id: tuple[int, ...]
) -> np.ndarray:
    joined = joined[()]
    b = _block_index(block_id, n_bx)
    start, stop = joined.offsets[b], joined.offsets[b + 1]
    table = np.concatenate([[0], joined.mapping[start + 1 : stop + 1]])
    return table[local]


def _sizes(joined: np.ndarray) -> np.ndarray:
    return joined[()].sizes


def _maxima(joined: np.ndarray) -> np.ndarray:
    return joined[()].maxima


def label_components(
    mask: da.Array | np.ndarray,
    values: da.Array | np.ndarray | None = None,
    *,
    wrap_x: bool = False,
) -> tuple[da.Array, da.Array, da.Array]:
    """Connected components of a boolean image or cube across tile borders, with statistics.

    Parameters
    ----------
    mask : dask or numpy array of bool, shape (ny, nx) or (n_scale, ny, nx)
        Pixels to label. Its chunks are the tiles (a cube's scale axis is made one chunk).
    values : dask or numpy array, same shape, optional
        Values whose maximum per component is wanted (significance).
    wrap_x : bool
        Periodic last axis (all-sky longitude).

    Returns
    -------
    labels : dask.array.Array of intp, same shape and chunks as ``mask``
        0 outside ``mask``; each component (4-connected within a ``(y, x)`` plane) has one label,
        unique over the whole array, consecutive from 1 (not in `scipy.ndimage.label`'s order).
    sizes, maxima : dask.array.Array, shape (n_components + 1,) (unknown until computed)
        Indexed by label (entry 0, the background, is 0 and ``-inf``): pixel count (int64) and
        maximum of ``values`` (float64; ``-inf`` without ``values``). Compute them together
        with ``labels`` to label each tile once.
    """
    mask = _as_mask(mask)
    if values is not None:
        values = _as_planes(values, "values")
        if values.shape != mask.shape:
            raise InputError(f"values shape {values.shape} differs from mask shape {mask.shape}")
    local, joined = _components(mask, values, wrap_x=wrap_x)
    labels = da.map_blocks(
        _relabel_block,
        local,
        joined,
        n_bx=mask.numblocks[-1],
        dtype=np.intp,
        meta=np.empty((0,) * mask.ndim, dtype=np.intp),
    )
    vectors = [
        da.map_blocks(
            func,
            joined,
            new_axis=0,
            chunks=((np.nan,),),
            dtype=dtype,
            meta=np.empty((0,), dtype=dtype),
        )
        for func, dtype in ((_sizes, np.int64), (_maxima, np.float64))
    ]
    return labels, vectors[0], vectors[1]


def _keep_table(joined: np.ndarray, *, cleaning: core.Cleaning) -> np.ndarray:
    """0-d (block offsets, per global block label whether its component survives)."""
    joined = joined[()]
    keep = core.component_keep(joined.sizes, joined.maxima, cleaning)
    return _wrapped((joined.offsets, keep[joined.mapping]))


def _keep_block(
    local: np.ndarray,
    table: np.ndarray,
    *,
    n_bx: int,
    block_id: tuple[int, ...],
) -> np.ndarray:
    offsets, keep = table[()]
    b = _block_index(block_id, n_bx)
    start, stop = offsets[b], offsets[b + 1]
    return np.concatenate([[False], keep[start + 1 : stop + 1]])[local]


def _drop_isolated(mask: da.Array, *, wrap_x: bool) -> da.Array:
    """``mask`` without its one-pixel components, from a one-pixel halo (no labelling): a
    component has exactly one pixel if and only if that pixel has no 4-neighbour in the mask."""
    y, x = mask.ndim - 2, mask.ndim - 1
    depth = {ax: 0 for ax in range(mask.ndim)} | {y: 1, x: 1}
    boundary: dict[int, bool | str] = {ax: False for ax in range(mask.ndim)}
    if wrap_x and mask.shape[-1] > 2:  # a seam adds neighbours only to rows of 3+ pixels
        boundary[x] = "periodic"
    return da.map_overlap(
        core.not_isolated,
        mask,
        depth=depth,
        boundary=boundary,
        trim=False,
        allow_rechunk=False,
        chunks=mask.chunks,
        dtype=bool,
        meta=np.empty((0,) * mask.ndim, dtype=bool),
    )


def clean_support(
    sig: da.Array | np.ndarray, cleaning: core.Cleaning, *, wrap_x: bool = False
) -> da.Array:
    """Significant pixels after ``cleaning``, as a dask array (step 5 of `docs/algorithm.md`,
    before the OR).

    The tiled counterpart of `cwtflow.core.clean_mask`, with the same mask for any chunking.
    Components are joined across tiles only when the island threshold needs their maxima;
    removing isolated pixels alone uses a one-pixel halo. (The tiled CWT cleans in its tiles
    without an island threshold and calls this only for the global step with one.)

    Parameters
    ----------
    sig : dask or numpy array of float, shape (ny, nx) or (n_scale, ny, nx)
        Significance of each pixel (per scale).
    cleaning : cwtflow.core.Cleaning
        The rule: threshold, isolated pixels, island threshold.
    wrap_x : bool
        Periodic last axis (all-sky longitude).

    Returns
    -------
    dask.array.Array of bool, same shape and chunks as ``sig`` (scale axis one chunk)
    """
    sig = _as_planes(sig, "sig")
    mask = sig > cleaning.threshold
    if cleaning.island_threshold is None:
        return _drop_isolated(mask, wrap_x=wrap_x) if cleaning.remove_isolated else mask
    local, joined = _components(mask, sig, wrap_x=wrap_x)
    table = da.map_blocks(
        _keep_table,
        joined,
        cleaning=cleaning,
        dtype=object,
        meta=np.empty((), dtype=object),
    )
    return da.map_blocks(
        _keep_block,
        local,
        table,
        n_bx=mask.numblocks[-1],
        dtype=bool,
        meta=np.empty((0,) * mask.ndim, dtype=bool),
    )


# --- the same steps for tasks that each hold one tile (`cwtflow.store_tiles`) ----------------


def tile_labels(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2 on one tile of significance planes (n_scale, ty, tx): its labels of ``sig >
    threshold`` and its report for `keep_table`."""
    local = _label_block(sig > threshold)
    return local, _block_report(local, sig)


def keep_table(
    reports: list[list[np.ndarray]], cleaning: core.Cleaning, *, wrap_x: bool
) -> np.ndarray:
    """Step 3 and the island rule: the reports of `tile_labels` (rows of tiles, C order) joined
    into the table `tile_kept` reads."""
    grid = np.empty((len(reports), len(reports[0])), dtype=object)
    for i, j in np.ndindex(grid.shape):
        grid[i, j] = reports[i][j].reshape(-1)[0]
    return _keep_table(_join(grid, wrap_x=wrap_x), cleaning=cleaning)


def tile_kept(
    local: np.ndarray, table: np.ndarray, n_bx: int, block_id: tuple[int, int]
) -> np.ndarray:
    """Step 4 on one tile: its kept pixels (bool, the shape of ``local``); ``n_bx`` tiles per
    row, ``block_id`` (i, j) of the tile."""
    return _keep_block(local, table, n_bx=n_bx, block_id=block_id)
