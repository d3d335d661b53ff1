"""Numeric core of one CWT iteration on one tile: pure numpy/scipy, no xarray, no dask.

Every function here trusts its inputs (float arrays of matching shapes and one dtype); validation
lives in the public layer (`cwtflow.engine`, `cwtflow.maps`). The same functions serve the
whole-map path and each dask tile. Arrays are float64 (the exact path) or float32 (the fast
engine, ``CWT(dtype="float32")``): every step keeps the dtype of its inputs, and the kernel
spectra are cast to it; only the convergence moments accumulate in float64.

Convolutions are FFT products on a grid of shape ``fft_shape`` with every kernel centred on the
grid origin, i.e. circular convolutions. An axis behaves like "same"-size linear convolution with
zeros outside the image when the grid is at least ``n + halo`` long on it (the wrap lands in
zero padding), and is periodic when the grid is exactly ``n`` long (all-sky longitude). A dask
tile carries its halo, so any grid at least as large as the tile is right for its interior.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .kernels import CWTKernels

__all__ = [
    "Cleaning",
    "KernelSpectra",
    "clean_mask",
    "combine_moments",
    "component_keep",
    "convolve_step",
    "error_and_mask",
    "fft_shape",
    "image_spectra",
    "kernel_spectra",
    "label",
    "not_isolated",
    "residual_moments",
    "significance",
    "update_model",
]

# 4-connectivity (scipy.ndimage.label's default cross structure).
CROSS = ndimage.generate_binary_structure(2, 1)

# Elementwise steps run over blocks of rows of about this many pixels (256 KiB of float64), so
# that the temporaries of a chain of operations stay in cache instead of streaming through
# memory once per operation.
BLOCK_PIXELS = 32768


def _row_blocks(ny: int, nx: int) -> list[slice]:
    rows = max(1, BLOCK_PIXELS // max(nx, 1))
    return [slice(r, min(r + rows, ny)) for r in range(0, ny, rows)]


class KernelSpectra(NamedTuple):
    """Real-FFT spectra of the kernels on one grid.

    ``wavelet`` and ``wavelet_sq`` have shape (n_scale, P0, P1 // 2 + 1), ``approx``
    (P0, P1 // 2 + 1).
    """

    shape: tuple[int, int]
    wavelet: np.ndarray
    wavelet_sq: np.ndarray
    approx: np.ndarray


def fft_shape(
    shape: tuple[int, int], halo: int, *, periodic: tuple[bool, bool] = (False, False)
) -> tuple[int, int]:
    """Smallest fast FFT grid for zero-padded (or, per axis, periodic) convolution of ``shape``."""
    out = []
    for n, wrap in zip(shape, periodic, strict=True):
        if wrap:
            out.append(int(n))
        else:
            out.append(scipy.fft.next_fast_len(max(int(n) + halo, 2 * halo + 1), real=True))
    return out[0], out[1]


def _centred(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``kernel`` placed with its centre on pixel (0, 0) of a periodic grid of ``shape``."""
    grid = np.zeros(shape)
    half = kernel.shape[0] // 2
    offsets = np.arange(kernel.shape[0]) - half
    rows = (offsets % shape[0])[:, None]
    cols = (offsets % shape[1])[None, :]
    np.add.at(grid, (rows, cols), kernel)  # add.at folds kernels wider than a periodic axis
    return grid


@lru_cache(maxsize=8)
def kernel_spectra(
    kernels: CWTKernels, shape: tuple[int, int], dtype: str = "float64"
) -> KernelSpectra:
    """Spectra of every kernel (and squared wavelet) on an FFT grid of ``shape``; cached.

    Computed in float64 and cast to the complex type of ``dtype`` (the images' dtype).
    """
    rfft = scipy.fft.rfft2
    complex_type = np.result_type(np.dtype(dtype), np.complex64)
    wavelet = np.stack([rfft(_centred(k, shape)) for k in kernels.wavelets])
    wavelet_sq = np.stack([rfft(_centred(k * k, shape)) for k in kernels.wavelets])
    approx = rfft(_centred(kernels.approx, shape))
    arrays = [a.astype(complex_type, copy=False) for a in (wavelet, wavelet_sq, approx)]
    for array in arrays:
        array.setflags(write=False)
    return KernelSpectra(shape, *arrays)


def _forward(padded: np.ndarray, workers: int, out: np.ndarray | None = None) -> np.ndarray:
    """``rfft2`` of a (..., P0, P1) image (stack) already zero-padded to the FFT grid (faster
    than letting scipy pad, and than pruning the zero rows by hand); written into ``out``
    when given. One worker on float64 uses numpy's pocketfft, which writes into ``out``
    without an intermediate array; more workers, or float32 (numpy's float32 transforms are
    slower than its float64 ones, scipy's twice as fast: `benchmarks/README.md`), use
    scipy.fft. ``padded`` may be overwritten."""
    if workers == 1 and padded.dtype == np.float64:
        return np.fft.rfft2(padded, out=out)
    spectra = scipy.fft.rfft2(padded, workers=workers, overwrite_x=True)
    if out is None:
        return spectra
    out[...] = spectra
    return out


def _padded(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (k, P0, P1) zero buffer holding the (k, ny, nx) ``images`` in its first rows/columns."""
    out = np.zeros((images.shape[0], *shape), dtype=images.dtype)
    out[:, : images.shape[1], : images.shape[2]] = images
    return out


def _inverse(
    spectra: np.ndarray, shape: tuple[int, int], out_shape: tuple[int, int], workers: int
) -> np.ndarray:
    """``irfft2(spectra, s=shape)[..., :ny, :nx]``, pruned: the column pass runs on every
    column, the row pass only on the ``ny`` rows kept. ``spectra`` is overwritten.

    Returns a (..., ny, nx) view into a new (..., ny, shape[1]) buffer (no copy). The library
    as in `_forward`.
    """
    ny, nx = out_shape
    if workers == 1 and spectra.dtype == np.complex128:
        columns = np.fft.ifft(spectra, axis=-2, out=spectra)
        real = np.empty(0, dtype=spectra.dtype).real.dtype
        planes = np.empty((*spectra.shape[:-2], ny, shape[1]), dtype=real)
        np.fft.irfft(columns[..., :ny, :], n=shape[1], axis=-1, out=planes)
    else:
        columns = scipy.fft.ifft(spectra, axis=-2, overwrite_x=True, workers=workers)
        planes = scipy.fft.irfft(columns[..., :ny, :], n=shape[1], axis=-1, workers=workers)
    return planes[..., :nx]


def image_spectra(*images: np.ndarray, shape: tuple[int, int], workers: int = 1) -> np.ndarray:
    """Stacked real-FFT spectra of ``images`` zero-padded to ``shape``."""
    return _forward(_padded(np.stack(images), shape), workers)


def convolve_step(
    counts: np.ndarray,
    background: np.ndarray,
    model: np.ndarray,
    approx: np.ndarray,
    spectra: KernelSpectra,
    *,
    const_spectra: np.ndarray | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolutions of one iteration (steps 1-3 of `docs/algorithm.md`).

    Parameters
    ----------
    counts, background, model, approx : ndarray, shape (ny, nx)
        C, B, M and A (the approximation of the previous iteration).
    spectra : KernelSpectra
        Kernel spectra on the FFT grid used for this tile.
    const_spectra : ndarray, shape (2, P0, P1 // 2 + 1), optional
        ``image_spectra(counts, background)`` on the same grid, when the caller keeps it across
        iterations (saves a forward FFT per iteration; only the counts spectrum is used).
    workers : int
        Threads for the FFTs.

    Returns
    -------
    The three are views of one new buffer (rows padded to the FFT grid: not C-contiguous), which
    the caller owns and may overwrite.

    transform : ndarray, shape (n_scale, ny, nx)
        ``conv(C - (M + B + A), K_i)``.
    error_sq : ndarray, shape (n_scale, ny, nx)
        ``conv(M + B + A, K_i**2)`` (variance of the transform; may hold rounding-level noise).
    new_approx : ndarray, shape (ny, nx)
        ``conv(C - M - B, G)``.
    """
    ny, nx = counts.shape
    shape = spectra.shape
    n_scale = spectra.wavelet.shape[0]
    # total = M + B + A and C - M - B (and C - total), written straight into the zero-padded
    # stack to transform
    padded = np.zeros((2 if const_spectra is not None else 3, *shape), dtype=counts.dtype)
    for r in _row_blocks(ny, nx):
        total, cmb = padded[0, r, :nx], padded[1, r, :nx]
        np.add(model[r], background[r], out=total)
        total += approx[r]
        np.subtract(counts[r], model[r], out=cmb)
        cmb -= background[r]
        if const_spectra is None:
            np.subtract(counts[r], total, out=padded[2, r, :nx])
    # Spectra land in the product planes they are last used in: the total in the last error
    # plane, C - M - B in the approximation plane, the excess in the first transform plane.
    n = n_scale
    products = np.empty((2 * n + 1, shape[0], shape[1] // 2 + 1), dtype=spectra.wavelet.dtype)
    f_total, f_cmb, f_excess = products[2 * n - 1], products[2 * n], products[0]
    _forward(padded[:2], workers, out=products[2 * n - 1 :])
    if const_spectra is None:
        _forward(padded[2], workers, out=f_excess)
    else:
        np.subtract(const_spectra[0], f_total, out=f_excess)
    for i in range(1, n):
        np.multiply(f_excess, spectra.wavelet[i], out=products[i])
    f_excess *= spectra.wavelet[0]
    for i in range(n - 1):
        np.multiply(f_total, spectra.wavelet_sq[i], out=products[n + i])
    f_total *= spectra.wavelet_sq[n - 1]
    f_cmb *= spectra.approx
    planes = _inverse(products, shape, (ny, nx), workers)
    return planes[:n_scale], planes[n_scale : 2 * n_scale], planes[2 * n_scale]


def convolve_approx(image: np.ndarray, spectra: KernelSpectra, *, workers: int = 1) -> np.ndarray:
    """``conv(image, G)`` with the approximation kernel (used once for ``approx_bkg``)."""
    spec = image_spectra(image, shape=spectra.shape, workers=workers)[0]
    spec *= spectra.approx
    return _inverse(spec, spectra.shape, image.shape, workers)


def significance(transform: np.ndarray, error_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error ``E = sqrt(max(error_sq, 0))`` and significance ``T / E`` (0 where ``E == 0``).

    Pixels with no variance under the kernel are not significant; no NaN or inf is produced.
    """
    error = np.maximum(error_sq, 0.0)
    np.sqrt(error, out=error)
    return error, _ratio(transform, error)


def _ratio(transform: np.ndarray, error: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``transform / error``, 0 where ``error == 0`` (``error >= 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.divide(transform, error, out=out)
    np.copyto(out, 0.0, where=error == 0)
    return out


@dataclass(frozen=True)
class Cleaning:
    """The support-cleaning rule (step 5 of `docs/algorithm.md`, before the OR with the previous
    support).

    A pixel of a scale is significant where its significance exceeds ``threshold``; of the
    4-connected components of significant pixels, one-pixel ones are dropped with
    ``remove_isolated``, and those whose maximum significance is below ``island_threshold``
    (when given). Built once by `cwtflow.engine.CWT`; every path (whole map, tiles, global
    labelling) applies it through this value.
    """

    threshold: float
    remove_isolated: bool = True
    island_threshold: float | None = None

    @property
    def local(self) -> bool:
        """Whether one pixel around a tile decides its cleaning (no island threshold)."""
        return self.island_threshold is None


def error_and_mask(
    transform: np.ndarray,
    error_sq: np.ndarray,
    threshold: float,
    *,
    sig: np.ndarray | None = None,
) -> np.ndarray:
    """One scale of `significance` and the threshold, row block by row block (fast path).

    ``error_sq`` (ny, nx) is turned into the error in place; returns ``sig > threshold`` with
    ``sig`` as `significance` defines it, which is also stored in ``sig`` when given.
    """
    ny, nx = transform.shape
    mask = np.empty((ny, nx), dtype=bool)
    blocks = _row_blocks(ny, nx)
    rows = blocks[0].stop
    scratch = np.empty((rows, nx)) if sig is None else None
    zero = np.empty((rows, nx), dtype=bool)
    for r in blocks:
        n = r.stop - r.start
        error = error_sq[r]
        np.maximum(error, 0.0, out=error)
        np.sqrt(error, out=error)
        ratio = scratch[:n] if sig is None else sig[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(transform[r], error, out=ratio)
        np.equal(error, 0.0, out=zero[:n])
        np.copyto(ratio, 0.0, where=zero[:n])
        np.greater(ratio, threshold, out=mask[r])
    return mask


def component_keep(sizes: np.ndarray, maxima: np.ndarray, cleaning: Cleaning) -> np.ndarray:
    """Which labelled components survive ``cleaning`` (index 0, the background, never does).

    ``sizes`` and ``maxima`` are indexed by label: pixel count and maximum significance.
    """
    keep = np.ones(sizes.shape, dtype=bool)
    keep[0] = False
    if cleaning.remove_isolated:
        keep &= sizes != 1
    if cleaning.island_threshold is not None:
        keep &= maxima >= cleaning.island_threshold
    return keep


def label(mask: np.ndarray, *, wrap_x: bool = False) -> tuple[np.ndarray, int]:
    """Components of an image (y, x) or of each plane of a cube (scale, y, x), 4-connected in
    (y, x): labels (0 = background, unique over the array) and their number.

    With ``wrap_x`` the last axis is periodic (all-sky longitude): components touching across
    the x seam are one. The labelling of the whole-map cleaning, of each tile of the global
    labelling (`cwtflow.labels`) and of the catalog's islands.
    """
    structure = np.zeros((3,) * mask.ndim, dtype=bool)
    structure[(1,) * (mask.ndim - 2)] = CROSS
    labels, n = ndimage.label(mask, structure=structure)
    if wrap_x and n:
        labels, n = _join_seam(labels, n)
    return labels, n


def _join_seam(labels: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Merge components touching across the x seam of a longitude-periodic map."""
    left, right = labels[..., 0], labels[..., -1]
    both = (left > 0) & (right > 0)
    if not both.any():
        return labels, n
    graph = coo_matrix((np.ones(both.sum()), (left[both], right[both])), shape=(n + 1, n + 1))
    n_comp, mapping = connected_components(graph, directed=False)
    # keep 0 as background: renumber so the background's component becomes 0
    mapping = mapping - mapping[0]
    mapping[mapping < 0] += n_comp
    return mapping[labels], n_comp - 1


def not_isolated(block: np.ndarray) -> np.ndarray:
    """Interior of a (..., ny + 2, nx + 2) mask carrying a one-pixel ring: the set pixels with
    a set 4-neighbour, i.e. the mask without its one-pixel components."""
    centre = block[..., 1:-1, 1:-1]
    neighbours = (
        block[..., :-2, 1:-1] | block[..., 2:, 1:-1] | block[..., 1:-1, :-2] | block[..., 1:-1, 2:]
    )
    return centre & neighbours


def _drop_isolated(mask: np.ndarray, *, wrap_x: bool) -> np.ndarray:
    """``mask`` without its one-pixel components: a pixel stays when one of its 4 neighbours is
    set (across the x seam with ``wrap_x``). `not_isolated` on the whole map, without the
    copy into a ringed array."""
    neighbour = np.zeros_like(mask)
    neighbour[1:] |= mask[:-1]
    neighbour[:-1] |= mask[1:]
    neighbour[:, 1:] |= mask[:, :-1]
    neighbour[:, :-1] |= mask[:, 1:]
    if wrap_x and mask.shape[1] > 1:
        neighbour[:, 0] |= mask[:, -1]
        neighbour[:, -1] |= mask[:, 0]
    neighbour &= mask
    return neighbour


def clean_mask(
    mask: np.ndarray, sig: np.ndarray | None, cleaning: Cleaning, *, wrap_x: bool = False
) -> np.ndarray:
    """The significant pixels ``mask`` of one scale after ``cleaning`` (step 5 of
    `docs/algorithm.md`).

    ``sig`` (the significance) is needed only for the island rule. One labelling pass and one
    pass over the labelled pixels, whatever the number of components; without an island
    threshold, isolated pixels are dropped without labelling.
    """
    if not cleaning.remove_isolated and cleaning.island_threshold is None:
        return mask
    if cleaning.island_threshold is None:
        return _drop_isolated(mask, wrap_x=wrap_x)
    labels, n = label(mask, wrap_x=wrap_x)
    if n == 0:
        return mask
    in_mask = labels[mask]
    sizes = np.bincount(in_mask, minlength=n + 1)
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, in_mask, sig[mask])
    return component_keep(sizes, maxima, cleaning)[labels]


def update_model(
    model: np.ndarray, support: np.ndarray, transform: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``T2 = sum_i S_i * T_i`` and ``M + max(T2, 0)`` (step 6 of `docs/algorithm.md`)."""
    transform_2d = np.where(support[0], transform[0], 0.0)
    for i in range(1, transform.shape[0]):
        transform_2d += np.where(support[i], transform[i], 0.0)
    new_model = np.maximum(transform_2d, 0.0)
    new_model += model
    return transform_2d, new_model


#: Fields of the last axis of `residual_moments`.
MOMENTS = ("pixels", "mean", "m2", "support")


def residual_moments(
    counts: np.ndarray, model: np.ndarray, approx: np.ndarray, support: np.ndarray
) -> np.ndarray:
    """Convergence statistics of one tile (or map), mergeable over tiles: shape (4,).

    ``[n, mean, M2, s]`` of the residual ``r = C - (M + A)``: pixel count, mean, sum of squared
    deviations from that mean (two passes, as `numpy.var`), and the pixels in the 2-D support
    (``support`` is (n_scale, ny, nx), bool). `combine_moments` merges them.
    """
    residual = np.empty(counts.shape)
    blocks = _row_blocks(*counts.shape)
    for r in blocks:
        np.add(model[r], approx[r], out=residual[r])
        np.subtract(counts[r], residual[r], out=residual[r])
    mean = residual.mean()
    for r in blocks:
        residual[r] -= mean
        np.multiply(residual[r], residual[r], out=residual[r])
    size = np.count_nonzero(np.logical_or.reduce(support, axis=0))
    return np.array([residual.size, mean, residual.sum(), size], dtype=np.float64)


def combine_moments(moments: np.ndarray) -> tuple[float, int]:
    """Residual variance and support size from `residual_moments` of disjoint tiles.

    ``moments`` has shape (..., 4). The variance is ``M2 / n`` of the union, with ``M2 = sum
    M2_i + sum n_i (mean_i - mean)**2`` (Chan et al.'s pairwise update, in closed form).
    """
    flat = np.asarray(moments, dtype=np.float64).reshape(-1, len(MOMENTS))
    n, means, m2, size = flat.T
    total = n.sum()
    mean = (n * means).sum() / total
    spread = m2.sum() + (n * (means - mean) ** 2).sum()
    return float(spread / total), int(size.sum())
