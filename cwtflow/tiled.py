"""One CWT iteration tile by tile: dask orchestration of the numpy core (`cwtflow.core`).

Each iteration is one lazy dask graph; nothing is computed here (the sink materialises the new
state and the per-tile statistics). Per iteration:

1. one task per tile over C, B, M and A with a halo of ``kernels.halo`` pixels (zeros beyond the
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
its neighbours' inputs), and the whole iteration of a tile is one function of its windows:
`TiledStep.tile_work` gives it (`TileWork`), so that a store, which already holds the inputs and
the previous state, runs one task per tile that reads its windows (`cwtflow.halo.window`),
computes, and writes its part of the new state: no halo pieces, no intermediate arrays and no
per-variable tasks in the graph. With an island threshold `TileWork` splits the tile's work in
two around the join of the components (`TileWork.planes`, `TileWork.finish`; see
`cwtflow.store_tiles`). The same functions make both paths' numbers.

``approx_bkg = conv(B, G)`` is constant: the first call computes it (`core.convolve_approx`
per tile); later calls take it from the materialised state they are given.

The halo is exchanged by `cwtflow.halo.overlapped_tiles` (equivalent to `dask.array.overlap`,
without halo-sized copies waiting between tasks).

Tile geometry, per axis: an axis cut into several tiles overlaps by the halo (dask pads the map
edge with zeros, or periodically); an axis that is one tile is not overlapped: its zero
boundary comes from the FFT grid's zero padding, and a periodic one is padded in the tile. The
FFT grid is one fast size (`scipy.fft.next_fast_len`) at least as large as every padded tile, so
one set of kernel spectra serves all tiles (`core.kernel_spectra` caches it per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np
import scipy.fft
import xarray as xr

from . import core, labels
from .allocator import heap_for_large_arrays
from .core import Cleaning
from .halo import overlapped_tiles, tile_chunks
from .iteration import Settings
from .kernels import CWTKernels
from .state import new_state

__all__ = ["TileWork", "TiledStep"]


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
    dtype: str = "float64",
    cleaning: Cleaning | None = None,
    ring: tuple[bool, bool] = (False, False),
    n_blocks: tuple[int, int] = (1, 1),
    block_id: tuple[int, ...] = (0, 0, 0),
) -> np.ndarray:
    """One tile (with its halo) -> interior (3 n_scale + 1, ty, tx): T, E, third block, A.

    Without ``cleaning`` the third block is the significance. With a local ``cleaning`` (no
    island threshold) it is the cleaned significant mask (0/1) of the tile: the tile
    carries one more pixel of halo than the convolutions need, so the significance of a
    one-pixel ring around the interior is exact and isolated pixels are dropped within the tile
    (`core.not_isolated`). ``ring[ax]`` tells whether that axis's ring holds map
    pixels (a halo or a periodic pad); ring pixels beyond a non-periodic map edge are never set.
    """
    heap_for_large_arrays()  # a dask worker's allocator maps every array afresh otherwise
    kernels = _kernels(*kernels)
    counts, background, model, approx = (
        a.astype(dtype, copy=False) for a in (counts, background, model, approx)
    )
    if wrap_pad:
        counts, background, model, approx = (
            _wrap_pad(a, wrap_pad) for a in (counts, background, model, approx)
        )
    spectra = core.kernel_spectra(kernels, grid, dtype)
    transform, error_sq, new_approx = core.convolve_step(counts, background, model, approx, spectra)
    inside = (slice(None), *_interior(counts, offsets))
    n = kernels.n_scale
    out = np.empty((3 * n + 1, *transform[inside].shape[-2:]), dtype=dtype)
    out[:n] = transform[inside]
    if cleaning is None:
        error, sig = core.significance(transform[inside], error_sq[inside])
        out[n : 2 * n] = error
        out[2 * n : 3 * n] = sig
    else:
        out[2 * n : 3 * n] = _clean_tile(
            transform,
            error_sq,
            out[n : 2 * n],
            cleaning=cleaning,
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
    cleaning: Cleaning,
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
    mask = np.pad(sig > cleaning.threshold, ((0, 0), *pads))
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
    if not cleaning.remove_isolated:
        return mask[:, 1:-1, 1:-1]
    return core.not_isolated(mask)


def _tile_approx(
    background: np.ndarray,
    *,
    kernels: tuple[int, float, float],
    grid: tuple[int, int],
    offsets: tuple[int, int],
    wrap_pad: int,
    dtype: str = "float64",
) -> np.ndarray:
    """``conv(B, G)`` on the interior of one tile."""
    kernels = _kernels(*kernels)
    background = background.astype(dtype, copy=False)
    if wrap_pad:
        background = _wrap_pad(background, wrap_pad)
    out = core.convolve_approx(background, core.kernel_spectra(kernels, grid, dtype))
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


@dataclass(frozen=True)
class TileWork:
    """One iteration of one tile as functions of its windows.

    Without an island threshold (``cleaning.local``) one call does it all:
    ``work(counts, background, model, approx, support, block_id) -> (arrays, moments)``:
    ``counts`` ... ``approx`` are the tile's windows with ``depth`` pixels of halo
    (`cwtflow.halo.window`, periodic in x with ``wrap``), ``support`` the previous support of
    the interior; ``arrays`` holds the interior of every variable of the new state that
    changes (with ``approx_bkg`` when ``approx_bkg`` is set), ``moments`` its
    `core.residual_moments`. With an island threshold the components are joined across tiles
    in between: `planes` (the uncleaned planes of the interior, whose `plane_arrays` are
    final), then, with the tile's kept pixels (`cwtflow.labels.tile_kept`), `finish`.
    ``chunks``: the (y, x) tiles; ``block_id``: (i, j) of the tile. Picklable: the kernels
    travel as their parameters.
    """

    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    depth: tuple[int, int]
    wrap: bool
    n_scale: int
    approx_bkg: bool
    tile_kwargs: dict[str, Any]
    cleaning: Cleaning
    ring: tuple[bool, bool]

    def __call__(
        self,
        counts: np.ndarray,
        background: np.ndarray,
        model: np.ndarray,
        approx: np.ndarray,
        support: np.ndarray,
        block_id: tuple[int, int],
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        n = self.n_scale
        planes = _tile_iteration(
            counts,
            background,
            model,
            approx,
            **self.tile_kwargs,
            cleaning=self.cleaning,
            ring=self.ring,
            n_blocks=(len(self.chunks[0]), len(self.chunks[1])),
            block_id=(0, *block_id),
        )
        inner = self.interior(counts.shape)
        arrays = self.plane_arrays(planes, background)
        kept = planes[2 * n : 3 * n] > 0.5
        changed, moments = self.finish(
            planes[:n], planes[3 * n], kept, model[inner], support, counts[inner]
        )
        return arrays | changed, moments

    def interior(self, shape: tuple[int, ...]) -> tuple[slice, slice]:
        """The tile inside a window of ``shape``."""
        dy, dx = self.depth
        return slice(dy, shape[0] - dy), slice(dx, shape[1] - dx)

    def planes(
        self, counts: np.ndarray, background: np.ndarray, model: np.ndarray, approx: np.ndarray
    ) -> np.ndarray:
        """(3 n_scale + 1, ty, tx): T, E, the significance S and A of the interior, uncleaned."""
        return _tile_iteration(counts, background, model, approx, **self.tile_kwargs)

    def plane_arrays(self, planes: np.ndarray, background: np.ndarray) -> dict[str, np.ndarray]:
        """The variables of the new state that the cleaning does not change: ``transform_3d``,
        ``error``, ``approx`` (and ``approx_bkg``, constant, in the first iteration, from the
        tile's ``background`` window)."""
        n = self.n_scale
        arrays = {"transform_3d": planes[:n], "error": planes[n : 2 * n], "approx": planes[3 * n]}
        if self.approx_bkg:
            arrays["approx_bkg"] = _tile_approx(background, **self.tile_kwargs)
        return arrays

    def finish(
        self,
        transform: np.ndarray,
        approx: np.ndarray,
        kept: np.ndarray,
        model: np.ndarray,
        support: np.ndarray,
        counts: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The variables the cleaning changes (``model``, ``transform_2d``, ``support``) and
        the moments, from the tile's new ``transform`` and ``approx``, its cleaned significant
        pixels ``kept`` and the interiors of the previous ``model``, ``support`` and of
        ``counts``."""
        support = support | kept
        transform_2d, new_model = core.update_model(model, support, transform)
        moments = core.residual_moments(counts, new_model, approx, support)
        return {"model": new_model, "transform_2d": transform_2d, "support": support}, moments


class TiledStep:
    """One CWT iteration on tiles of a dask-backed state (see the module docstring).

    Parameters
    ----------
    settings : Settings
        The run's settings (kernels and cleaning rule are used).
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

    def __init__(self, settings: Settings, data: xr.Dataset, wrap: bool) -> None:
        self.kernels = settings.kernels
        self.cleaning = settings.cleaning
        self.dtype = np.dtype(settings.dtype)
        self.wrap = bool(wrap)
        source = next(
            (data[n].data for n in ("counts", "background") if isinstance(data[n].data, da.Array)),
            None,
        )
        if source is None:
            source = da.asarray(data["counts"].data)
        #: (y, x) chunks of the inputs: the chunks of every state returned.
        self.chunks: tuple[tuple[int, ...], tuple[int, ...]] = source.chunks
        halo = self.kernels.halo
        depth = (halo, halo)
        #: cleaning inside the tiles: no island threshold, so no component crosses a tile
        #: border in a way that matters beyond one pixel; tiles carry one more pixel of halo.
        self.local_clean = self.cleaning.local
        if self.local_clean:
            depth = (depth[0] + 1, depth[1] + 1)
        #: (y, x) chunks the iteration works on: each at least the halo (or the whole axis).
        self.work_chunks = (
            tile_chunks(self.chunks[0], depth[0]),
            tile_chunks(self.chunks[1], depth[1]),
        )
        split = tuple(len(c) > 1 for c in self.work_chunks)
        #: halo dask adds around each tile, per axis (none on an axis that is one tile).
        self.depth = {ax: depth[ax] if split[ax] else 0 for ax in (0, 1)}
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
            "dtype": self.dtype.name,
        }
        self._clean_kwargs: dict[str, Any] = {}
        if self.local_clean:
            # a periodic seam adds neighbours only when a row has at least three pixels
            seam = self.wrap and int(data.sizes["x"]) > 2
            self._clean_kwargs = {
                "cleaning": self.cleaning,
                "ring": (False, seam),
                "n_blocks": (len(self.work_chunks[0]), len(self.work_chunks[1])),
                "block_id": True,
            }
        self._approx_bkg_known = False

    def tile_work(self, align: tuple[int, int]) -> TileWork | None:
        """The next iteration as functions of one tile (`TileWork`), or None when a tile edge
        is not a multiple of ``align`` (the store's chunks: tiles written apart must not share a
        chunk). Returning work counts as taking the step: ``approx_bkg`` is computed by the
        first iteration only."""
        edges = [np.cumsum(axis)[:-1] for axis in self.work_chunks]
        if any((e % a).any() for e, a in zip(edges, align, strict=True)):
            return None
        work = TileWork(
            chunks=self.work_chunks,
            depth=(self.depth[0], self.depth[1]),
            wrap=self.wrap,
            n_scale=self.kernels.n_scale,
            approx_bkg=not self._approx_bkg_known,
            tile_kwargs=self._tile_kwargs,
            cleaning=self.cleaning,
            ring=self._clean_kwargs.get("ring", (False, False)),
        )
        self._approx_bkg_known = True
        return work

    def _image(self, array: Any) -> da.Array:
        return da.asarray(array).rechunk(self.work_chunks)

    def _overlapped(
        self, func: Any, *images: da.Array, planes: int | None, **kwargs: Any
    ) -> da.Array:
        """``func`` on every tile of ``images`` with its halo; returns the tile interiors."""
        return overlapped_tiles(
            func,
            images,
            (self.depth[0], self.depth[1]),
            self.wrap,
            planes=planes,
            result_dtype=self.dtype,
            **self._tile_kwargs,
            **kwargs,
        )

    def __call__(self, state: xr.Dataset) -> tuple[xr.Dataset, da.Array]:
        """The lazy state after one more iteration and its lazy per-tile moments."""
        n = self.kernels.n_scale
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
            kept = labels.clean_support(third, self.cleaning, wrap_x=self.wrap)
        support = previous_support | kept
        updated = da.map_blocks(
            _tile_update,
            model,
            support,
            transform,
            chunks=((2,), *self.work_chunks),
            dtype=self.dtype,
            meta=np.empty((0, 0, 0), dtype=self.dtype),
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
