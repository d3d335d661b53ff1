"""What a run may use, checked before any work: kernel size against the map, the number of
tiles, and the estimated working set against the memory available (`check_resources`)."""

from __future__ import annotations

import os

import psutil

from . import core
from .errors import ResourceError
from .kernels import CWTKernels

__all__ = ["MAX_TILES", "check_resources"]

#: A kernel may be at most this many times the larger map side (`check_resources`)...
KERNEL_MAP_RATIO = 4
#: ...or this many pixels on any map (kernels of width up to 16 px: FFT grids under 0.3 MB).
SMALL_KERNEL = 129
#: Share of the available memory (psutil) the estimated working set may take.
MEMORY_FRACTION = 0.8
#: Most tiles a run may be cut into: each tile is a dask task per step and a file per stored
#: array and iteration (a 1000 x 1000 map in 1-pixel tiles would write millions of files).
MAX_TILES = 100_000


def check_resources(
    kernels: CWTKernels,
    shape: tuple[int, int],
    *,
    tiles: tuple[int, int, int] | None = None,
    in_memory_state: bool = True,
    local: bool = True,
) -> None:
    """Refuse a run that cannot run, before any work: raises `ResourceError` saying why.

    The rules, for a map of ``shape`` (ny, nx) and kernels of largest side ``S``
    (``kernels.size``, halo ``h = S // 2``):

    - ``S <= max(KERNEL_MAP_RATIO * max(ny, nx), SMALL_KERNEL)`` (4 x the larger side, or 129
      pixels on any map): with the zero boundary, a kernel's part beyond twice the map side
      never meets a pixel, so a larger kernel only costs time and memory;
    - ``tiles`` (count, tile ny, tile nx) of a tiled run: at most `MAX_TILES` tiles;
    - the estimated working set, at most `MEMORY_FRACTION` (80 %) of the memory available
      (``psutil.virtual_memory().available``) when the run is ``local``: FFT grids of
      ``G = fft_shape(map or tile + 2 h, h)`` pixels hold ``4 * n_scale + 6`` spectra of
      ``8 G`` bytes (kernel, squared-kernel and image spectra, convolution buffers), per
      dask thread for tiles; and, unless the state goes to a store (``in_memory_state``
      false), two states of ``3 * n_scale + 9`` float64 planes of the map.
    """
    ny, nx = shape
    side, halo, n_scale = kernels.size, kernels.halo, kernels.n_scale
    allowed = max(KERNEL_MAP_RATIO * max(ny, nx), SMALL_KERNEL)
    if side > allowed:
        raise ResourceError(
            f"kernels too large for the map: the largest kernel is {side} pixels wide and the "
            f"map {ny} x {nx} pixels; at most {allowed} pixels ({KERNEL_MAP_RATIO} x the "
            f"larger map side, or {SMALL_KERNEL}) are allowed: lower n_scale, min_scale or "
            "step_scale"
        )
    if tiles is not None and tiles[0] > MAX_TILES:
        raise ResourceError(
            f"too many tiles: {tiles[0]} tiles of {tiles[1]} x {tiles[2]} pixels for a "
            f"{ny} x {nx} map (at most {MAX_TILES}: every tile is a dask task per step and a "
            "file per stored array); use larger chunks"
        )
    if not local:
        return
    if tiles is None:
        grid = core.fft_shape(shape, halo)
        threads = 1
    else:
        grid = core.fft_shape((tiles[1] + 2 * halo, tiles[2] + 2 * halo), halo)
        threads = min(tiles[0], os.cpu_count() or 1)
    need = 8 * grid[0] * grid[1] * (4 * n_scale + 6) * threads
    if in_memory_state:
        need += 2 * 8 * ny * nx * (3 * n_scale + 9)
    available = psutil.virtual_memory().available
    if need > MEMORY_FRACTION * available:
        raise ResourceError(
            f"not enough memory: the run needs about {need / 1024**3:.3g} GiB (FFT grid "
            f"{grid[0]} x {grid[1]}, {n_scale} scales) and {available / 1024**3:.3g} GiB are "
            f"available (at most {MEMORY_FRACTION:.0%} may be used): use smaller kernels, "
            "or tiles (chunks) and a store"
        )
