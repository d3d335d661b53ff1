"""One CWT iteration tile by tile: dask orchestration of the numpy core (`cwtflow.core`).

Each iteration is one lazy dask graph; nothing is computed here (the sink materialises the new
state and the per-tile statistics). Per iteration:

1. one task per tile over C, B, M and A with a halo of `halo_depth` pixels (zeros beyond the
   map edge; periodic in x for all-sky maps) calls `core.convolve_step` and
   `core.significance` and keeps the tile interior: T, E, significance, new A;
2. support cleaning: with an island threshold a global step with dask
   (`cwtflow.labels.clean_support`): components crossing tile borders are joined without
   gathering the map. Without one, only one-pixel components are dropped, which needs one more
   pixel around the tile: the tiles carry a halo one pixel deeper, and step 1 returns the
   cleaned mask instead of the significance (no cross-tile dependency after the inputs);
3. ``S = S_prev | kept`` and `core.update_model` block by block, and each tile's
   `core.residual_moments` (residual variance and support size merge from them).

Without an island threshold no tile of the new state depends on another tile's result (only on
its neighbours' inputs): `TiledStep.independent_tiles` gives these tiles, so that a store can
write the new state a group of tiles at a time.

``approx_bkg = conv(B, G)`` is constant: the first call computes it (`core.convolve_approx`
per tile); later calls take it from the materialised state they are given.

The halo is exchanged by `_halo_graph` rather than `dask.array.overlap`: a block's neighbours
receive small copies of its edges, not views of it, and each tile task assembles its own halo
(`_overlapped_tiles`), so no halo-sized copy of a tile waits between tasks.

Tile geometry, per axis: an axis cut into several tiles overlaps by the halo (dask pads the map
edge with zeros, or periodically); an axis that is one tile is not overlapped: its zero
boundary comes from the FFT grid's zero padding, and a periodic one is padded in the tile. The
FFT grid is one fast size (`scipy.fft.next_fast_len`) at least as large as every padded tile, so
one set of kernel spectra serves all tiles (`core.kernel_spectra` caches it per process).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import scipy.fft
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.utils import apply, funcname

from . import core, labels
from .kernels import CWTKernels
from .state import new_state

if TYPE_CHECKING:
    from .engine import CWT

__all__ = ["TiledStep", "halo_depth", "tile_chunks"]


def halo_depth(kernels: CWTKernels) -> tuple[int, int]:
    """Overlap (pixels, per axis y and x) a tile needs for exact convolutions.

    Half the side of the largest kernel (wavelets and approximation): a pixel's convolution
    reads the pixels within that distance. Equals ``(kernels.halo, kernels.halo)``.
    """
    arrays = (*kernels.wavelets, kernels.approx)
    return (
        max(k.shape[0] for k in arrays) // 2,
        max(k.shape[1] for k in arrays) // 2,
    )


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


def _grid_length(chunks: tuple[int, ...], depth: int, periodic: bool) -> int:
    """FFT grid length along one axis for the tiles of ``chunks`` (see the module docstring)."""
    if len(chunks) > 1 or periodic:
        needed = max(chunks) + 2 * depth  # halo on both sides, real or padded in the tile
    else:
        needed = chunks[0] + depth  # one tile: zero boundary from the grid's padding
    return scipy.fft.next_fast_len(needed, real=True)


@lru_cache(maxsize=4)
def _kernels(n_scale: int, min_scale: float, step_scale: float) -> CWTKernels:
    """The kernels rebuilt from their parameters in a task (cheaper to ship than the arrays)."""
    return CWTKernels(n_scale, min_scale, step_scale)


def _wrap_pad(image: np.ndarray, depth: int) -> np.ndarray:
    return np.pad(image, ((0, 0), (depth, depth)), mode="wrap")


def _interior(image: np.ndarray, offsets: tuple[int, int]) -> tuple[slice, slice]:
    (oy, ox), (ny, nx) = offsets, image.shape[-2:]
    return slice(oy, ny - oy), slice(ox, nx - ox)


def _pieces(block: np.ndarray, depth: tuple[int, int]) -> dict[tuple[int, int], np.ndarray]:
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


def _assemble(
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
            pieces = neighbours[a][b]
            if pieces is None:
                row.append(np.zeros((size[sy][0], size[sx][1]), dtype=block.dtype))
            else:
                row.append(pieces[(sy, sx)])
        rows.append(row)
    return np.block(rows)


def _halo_graph(
    image: da.Array, depth: tuple[int, int], periodic_x: bool
) -> tuple[dict[Any, Any], dict[tuple[int, int], tuple[Any, list[list[Any]]]]]:
    """The halo exchange of a 2-D ``image``: its pieces tasks and, per block, what to assemble
    (the same tiles as `dask.array.overlap`, zeros beyond the map or periodic in x).

    Returns ``(dsk, sources)``: ``dsk`` holds one `_pieces` task per block; ``sources[i, j]``
    is ``(block key, neighbours)`` with ``neighbours`` the 3 x 3 (or 1 x 3, 3 x 1) grid of
    `_assemble`'s argument as task keys (None beyond the map; periodic in x with
    ``periodic_x``). An axis of depth 0 gets no halo.
    """
    dy, dx = depth
    pieces_name = f"halo-pieces-{tokenize(image, dy, dx, periodic_x)}"
    nby, nbx = image.numblocks
    dsk: dict[Any, Any] = {}
    sources: dict[tuple[int, int], tuple[Any, list[list[Any]]]] = {}
    for i, j in np.ndindex(nby, nbx):
        dsk[(pieces_name, i, j)] = (_pieces, (image.name, i, j), depth)
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


def _run_tile(
    func: Any, blocks: list[Any], neighbours: list[Any], depth: tuple[int, int], **kwargs: Any
) -> np.ndarray:
    """``func`` on the tiles (block plus halo) assembled from each image's block and pieces."""
    tiles = [_assemble(b, n, depth) for b, n in zip(blocks, neighbours, strict=True)]
    return func(*tiles, **kwargs)


def _overlapped_tiles(
    func: Any,
    images: Sequence[da.Array],
    depth: tuple[int, int],
    periodic_x: bool,
    *,
    planes: int | None,
    block_id: bool = False,
    **kwargs: Any,
) -> da.Array:
    """``func(*tiles, **kwargs)`` per block of ``images`` (same chunks), each tile with its halo.

    One task per tile, which assembles the tiles from the block and its neighbours' pieces
    itself: no tile-sized intermediate waits in memory between tasks, and dask's ordering sees
    one task per tile consuming the inputs. ``func`` returns a (``planes``, ty, tx) array (or
    (ty, tx) with ``planes=None``) of the tile interiors; with ``block_id`` it also receives
    ``block_id=(0, i, j)`` (or ``(i, j)``).
    """
    graphs = [_halo_graph(image, depth, periodic_x) for image in images]
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
        task = (apply, _run_tile, [func, blocks, neighbours, depth], extra)
        dsk[(name, i, j) if planes is None else (name, 0, i, j)] = task
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=list(images))
    if planes is None:
        chunks, meta = first.chunks, np.empty((0, 0))
    else:
        chunks, meta = ((planes,), *first.chunks), np.empty((0, 0, 0))
    return da.Array(graph, name, chunks, dtype=np.float64, meta=meta)


def _tile_iteration(
    counts: np.ndarray,
    background: np.ndarray,
    model: np.ndarray,
    approx: np.ndarray,
    *,
    kernels: tuple[int, float, float],
    grid: tuple[int, int],
    offsets: tuple[int, int],
    wrap_pad: int,
    clean: tuple[float, bool, tuple[bool, bool]] | None = None,
    n_blocks: tuple[int, int] = (1, 1),
    block_id: tuple[int, ...] = (0, 0, 0),
) -> np.ndarray:
    """One tile (with its halo) -> interior (3 n_scale + 1, ty, tx): T, E, third block, A.

    Without ``clean`` the third block is the significance. With ``clean = (threshold,
    remove_isolated, ring)`` it is the cleaned significant mask (0/1) of the tile: the tile
    carries one more pixel of halo than the convolutions need, so the significance of a
    one-pixel ring around the interior is exact and isolated pixels are dropped within the tile
    (`labels.drop_isolated`'s rule). ``ring[ax]`` tells whether that axis's ring holds map
    pixels (a halo or a periodic pad); ring pixels beyond a non-periodic map edge are never set.
    """
    kernels = _kernels(*kernels)
    if wrap_pad:
        counts, background, model, approx = (
            _wrap_pad(a, wrap_pad) for a in (counts, background, model, approx)
        )
    spectra = core.kernel_spectra(kernels, grid)
    transform, error_sq, new_approx = core.convolve_step(counts, background, model, approx, spectra)
    inside = (slice(None), *_interior(counts, offsets))
    n = kernels.n_scale
    out = np.empty((3 * n + 1, *transform[inside].shape[-2:]))
    out[:n] = transform[inside]
    if clean is None:
        error, sig = core.significance(transform[inside], error_sq[inside])
        out[n : 2 * n] = error
        out[2 * n : 3 * n] = sig
    else:
        threshold, remove_isolated, ring = clean
        out[2 * n : 3 * n] = _clean_tile(
            transform,
            error_sq,
            out[n : 2 * n],
            threshold=threshold,
            remove_isolated=remove_isolated,
            offsets=offsets,
            ring=ring,
            edges=_edges(block_id[-2:], n_blocks),
        )
    out[3 * n] = new_approx[inside[1:]]
    return out


def _edges(block: tuple[int, ...], n_blocks: tuple[int, int]) -> tuple[tuple[bool, bool], ...]:
    """Per axis (y, x): whether the tile touches the (low, high) map edge."""
    return tuple((b == 0, b == nb - 1) for b, nb in zip(block, n_blocks, strict=True))


def _clean_tile(
    transform: np.ndarray,
    error_sq: np.ndarray,
    error_out: np.ndarray,
    *,
    threshold: float,
    remove_isolated: bool,
    offsets: tuple[int, int],
    ring: tuple[bool, bool],
    edges: tuple[tuple[bool, bool], ...],
) -> np.ndarray:
    """Error of the interior (into ``error_out``) and its cleaned significant mask (bool)."""
    ny, nx = transform.shape[-2:]
    wide: list[slice] = []
    pads: list[tuple[int, int]] = []
    for o, size in zip(offsets, (ny, nx), strict=True):
        if o >= 1:  # ring pixels are in the tile (halo or periodic pad)
            wide.append(slice(o - 1, size - o + 1))
            pads.append((0, 0))
        else:  # one tile along a non-periodic axis: the ring is beyond the map
            wide.append(slice(0, size))
            pads.append((1, 1))
    region = (slice(None), *wide)
    error, sig = core.significance(transform[region], error_sq[region])
    centre = (slice(None), *(slice(None) if pad[0] else slice(1, -1) for pad in pads))
    error_out[...] = error[centre]
    mask = np.pad(sig > threshold, ((0, 0), *pads))
    for ax, (low, high) in enumerate(edges):
        if pads[ax] != (0, 0) or ring[ax]:
            continue
        index: list[Any] = [slice(None)] * 3
        if low:
            index[ax + 1] = 0
            mask[tuple(index)] = False
        if high:
            index[ax + 1] = -1
            mask[tuple(index)] = False
    if not remove_isolated:
        return mask[:, 1:-1, 1:-1]
    return labels._not_isolated(mask)


def _tile_approx(
    background: np.ndarray,
    *,
    kernels: tuple[int, float, float],
    grid: tuple[int, int],
    offsets: tuple[int, int],
    wrap_pad: int,
) -> np.ndarray:
    """``conv(B, G)`` on the interior of one tile."""
    kernels = _kernels(*kernels)
    if wrap_pad:
        background = _wrap_pad(background, wrap_pad)
    out = core.convolve_approx(background, core.kernel_spectra(kernels, grid))
    return np.array(out[_interior(background, offsets)])


def _tile_moments(
    counts: np.ndarray, model: np.ndarray, approx: np.ndarray, support: np.ndarray
) -> np.ndarray:
    """(1, 1, 4): `core.residual_moments` of one tile."""
    return core.residual_moments(counts, model, approx, support)[None, None, :]


def _tile_update(model: np.ndarray, support: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """(2, ty, tx): ``T2`` and the new model of one tile."""
    transform_2d, new_model = core.update_model(model, support, transform)
    return np.stack([transform_2d, new_model])


class TiledStep:
    """One CWT iteration on tiles of a dask-backed state (see the module docstring).

    Parameters
    ----------
    cwt : CWT
        The estimator (kernels, thresholds, cleaning options).
    data : xarray.Dataset
        Validated input maps with dask-backed ``counts`` (or ``background``); their (y, x)
        chunks are the tiles and the chunking of every state returned.
    wrap : bool
        Periodic longitude (x) for convolutions and components.

    Notes
    -----
    ``step(state) -> (new_state, moments)``: ``state`` holds the `cwtflow.state.STATE_VARS`
    (numpy or dask, any chunks); ``new_state`` is lazy with (y, x) chunks of ``data`` and the
    scale axis one chunk; ``moments`` is a lazy (n_tiles_y, n_tiles_x, 4) array of each work
    tile's `core.residual_moments` (one chunk per tile), merged by `core.combine_moments`.
    Building the graph computes nothing.
    """

    def __init__(self, cwt: CWT, data: xr.Dataset, wrap: bool) -> None:
        self.cwt = cwt
        self.kernels = cwt.kernels
        self.wrap = bool(wrap)
        source = next(
            (data[n].data for n in ("counts", "background") if isinstance(data[n].data, da.Array)),
            None,
        )
        if source is None:
            source = da.asarray(data["counts"].data)
        #: (y, x) chunks of the inputs: the chunks of every state returned.
        self.chunks: tuple[tuple[int, ...], tuple[int, ...]] = source.chunks
        depth = halo_depth(self.kernels)
        #: cleaning inside the tiles: no island threshold, so no component crosses a tile
        #: border in a way that matters beyond one pixel; tiles carry one more pixel of halo.
        self.local_clean = cwt.significance_island_threshold is None
        if self.local_clean:
            depth = (depth[0] + 1, depth[1] + 1)
        #: (y, x) chunks the iteration works on: each at least the halo (or the whole axis).
        self.work_chunks = (
            tile_chunks(self.chunks[0], depth[0]),
            tile_chunks(self.chunks[1], depth[1]),
        )
        #: (y, x) chunks of tiles of a new state computable each on its own (from its
        #: neighbours' inputs, no global step), or None with an island threshold: then any
        #: group of these tiles can be computed (and stored) alone.
        self.independent_tiles = self.work_chunks if self.local_clean else None
        split = tuple(len(c) > 1 for c in self.work_chunks)
        #: halo dask adds around each tile, per axis (none on an axis that is one tile).
        self.depth = {ax: depth[ax] if split[ax] else 0 for ax in (0, 1)}
        self.boundary: dict[int, Any] = {0: 0, 1: "periodic" if self.wrap else 0}
        wrap_pad = depth[1] if self.wrap and not split[1] else 0
        offsets = (self.depth[0], self.depth[1] or wrap_pad)
        grid = (
            _grid_length(self.work_chunks[0], depth[0], False),
            _grid_length(self.work_chunks[1], depth[1], self.wrap),
        )
        self._tile_kwargs = {
            "kernels": (self.kernels.n_scale, self.kernels.min_scale, self.kernels.step_scale),
            "grid": grid,
            "offsets": offsets,
            "wrap_pad": wrap_pad,
        }
        self._clean_kwargs: dict[str, Any] = {}
        if self.local_clean:
            seam = self.wrap and int(data.sizes["x"]) > 2  # see labels.drop_isolated
            self._clean_kwargs = {
                "clean": (
                    float(cwt.significance_threshold),
                    bool(cwt.remove_isolated),
                    (False, seam),
                ),
                "n_blocks": (len(self.work_chunks[0]), len(self.work_chunks[1])),
                "block_id": True,
            }
        self._approx_bkg_known = False

    def _image(self, array: Any) -> da.Array:
        return da.asarray(array).rechunk(self.work_chunks)

    def _overlapped(
        self, func: Any, *images: da.Array, planes: int | None, **kwargs: Any
    ) -> da.Array:
        """``func`` on every tile of ``images`` with its halo; returns the tile interiors."""
        return _overlapped_tiles(
            func,
            images,
            (self.depth[0], self.depth[1]),
            self.boundary[1] == "periodic",
            planes=planes,
            **self._tile_kwargs,
            **kwargs,
        )

    def __call__(self, state: xr.Dataset) -> tuple[xr.Dataset, da.Array]:
        """The lazy state after one more iteration and its lazy per-tile moments."""
        cwt, n = self.cwt, self.kernels.n_scale
        counts, background, model, approx = (
            self._image(state[name].data) for name in ("counts", "background", "model", "approx")
        )
        cube_chunks = ((n,), *self.work_chunks)
        previous_support = da.asarray(state["support"].data).rechunk(cube_chunks)
        # constant images pass through as they came (no rechunk round trip)
        unchanged = {name: da.asarray(state[name].data) for name in ("counts", "background")}
        if self._approx_bkg_known:
            unchanged["approx_bkg"] = da.asarray(state["approx_bkg"].data)
            approx_bkg = None
        else:
            approx_bkg = self._overlapped(_tile_approx, background, planes=None)
            self._approx_bkg_known = True

        planes = self._overlapped(
            _tile_iteration,
            counts,
            background,
            model,
            approx,
            planes=3 * n + 1,
            **self._clean_kwargs,
        )
        transform, error, third = planes[:n], planes[n : 2 * n], planes[2 * n : 3 * n]
        new_approx = planes[3 * n]

        if self.local_clean:
            kept = third > 0.5  # the cleaned mask, 0/1, computed in the tiles
        else:
            kept = labels.clean_support(
                third,
                cwt.significance_threshold,
                remove_isolated=cwt.remove_isolated,
                island_threshold=cwt.significance_island_threshold,
                wrap_x=self.wrap,
            )
        support = previous_support | kept
        updated = da.map_blocks(
            _tile_update,
            model,
            support,
            transform,
            chunks=((2,), *self.work_chunks),
            dtype=np.float64,
            meta=np.empty((0, 0, 0)),
        )
        transform_2d, new_model = updated[0], updated[1]
        moments = da.blockwise(
            _tile_moments,
            "ijk",
            counts,
            "ij",
            new_model,
            "ij",
            new_approx,
            "ij",
            support,
            "sij",
            new_axes={"k": len(core.MOMENTS)},
            adjust_chunks={"i": 1, "j": 1},
            concatenate=True,
            dtype=np.float64,
            meta=np.empty((0, 0, 0)),
        )

        images = {"model": new_model, "approx": new_approx, "transform_2d": transform_2d}
        if approx_bkg is not None:
            images["approx_bkg"] = approx_bkg
        cubes = {"transform_3d": transform, "error": error, "support": support}
        arrays = {name: a.rechunk(self.chunks) for name, a in (unchanged | images).items()}
        arrays |= {name: a.rechunk(((n,), *self.chunks)) for name, a in cubes.items()}
        return new_state(state, arrays, self.kernels), moments
