"""Numeric core of one CWT iteration on one tile: pure numpy/scipy, no xarray, no dask.

Every function here trusts its inputs (float64 arrays of matching shapes); validation lives in
the public layer (`cwtflow.engine`, `cwtflow.maps`). The same functions serve the whole-map
path and each dask tile.

Convolutions are FFT products on a grid of shape ``fft_shape`` with every kernel centred on the
grid origin, i.e. circular convolutions. An axis behaves like "same"-size linear convolution with
zeros outside the image when the grid is at least ``n + halo`` long on it (the wrap lands in
zero padding), and is periodic when the grid is exactly ``n`` long (all-sky longitude). A dask
tile carries its halo, so any grid at least as large as the tile is right for its interior.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .kernels import CWTKernels

__all__ = [
    "KernelSpectra",
    "clean_support",
    "component_keep",
    "convolve_step",
    "fft_shape",
    "image_spectra",
    "kernel_spectra",
    "significance",
    "update_model",
]

# 4-connectivity (scipy.ndimage.label's default cross structure).
CROSS = ndimage.generate_binary_structure(2, 1)


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
def kernel_spectra(kernels: CWTKernels, shape: tuple[int, int]) -> KernelSpectra:
    """Spectra of every kernel (and squared wavelet) on an FFT grid of ``shape``; cached."""
    rfft = scipy.fft.rfft2
    wavelet = np.stack([rfft(_centred(k, shape)) for k in kernels.wavelets])
    wavelet_sq = np.stack([rfft(_centred(k * k, shape)) for k in kernels.wavelets])
    approx = rfft(_centred(kernels.approx, shape))
    for array in (wavelet, wavelet_sq, approx):
        array.setflags(write=False)
    return KernelSpectra(shape, wavelet, wavelet_sq, approx)


def image_spectra(*images: np.ndarray, shape: tuple[int, int], workers: int = 1) -> np.ndarray:
    """Stacked real-FFT spectra of ``images`` zero-padded to ``shape``."""
    return scipy.fft.rfft2(np.stack(images), s=shape, workers=workers)


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
    """Convolutions of one iteration (spec steps 1-3).

    Parameters
    ----------
    counts, background, model, approx : ndarray, shape (ny, nx)
        C, B, M and A (the approximation of the previous iteration).
    spectra : KernelSpectra
        Kernel spectra on the FFT grid used for this tile.
    const_spectra : ndarray, shape (2, P0, P1 // 2 + 1), optional
        ``image_spectra(counts, background)`` on the same grid, when the caller keeps it across
        iterations (saves two forward FFTs per iteration).
    workers : int
        Threads for scipy.fft.

    Returns
    -------
    transform : ndarray, shape (n_scale, ny, nx)
        ``conv(C - (M + B + A), K_i)``.
    error_sq : ndarray, shape (n_scale, ny, nx)
        ``conv(M + B + A, K_i**2)`` (variance of the transform; may hold rounding-level noise).
    new_approx : ndarray, shape (ny, nx)
        ``conv(C - M - B, G)``.
    """
    ny, nx = counts.shape
    shape = spectra.shape
    if const_spectra is None:
        f_total, f_cmb = image_spectra(
            model + background + approx, counts - model - background, shape=shape, workers=workers
        )
        f_excess = f_cmb - image_spectra(approx, shape=shape, workers=workers)[0]
    else:
        f_counts, f_background = const_spectra
        f_model, f_approx = image_spectra(model, approx, shape=shape, workers=workers)
        f_cmb = f_counts - f_background - f_model
        f_excess = f_cmb - f_approx
        f_total = f_model + f_background + f_approx
    n_scale = spectra.wavelet.shape[0]
    products = np.empty((2 * n_scale + 1, *f_cmb.shape), dtype=f_cmb.dtype)
    np.multiply(f_excess, spectra.wavelet, out=products[:n_scale])
    np.multiply(f_total, spectra.wavelet_sq, out=products[n_scale : 2 * n_scale])
    np.multiply(f_cmb, spectra.approx, out=products[2 * n_scale])
    planes = scipy.fft.irfft2(products, s=shape, workers=workers, overwrite_x=True)
    planes = planes[:, :ny, :nx]
    return planes[:n_scale], planes[n_scale : 2 * n_scale], np.ascontiguousarray(planes[-1])


def convolve_approx(image: np.ndarray, spectra: KernelSpectra, *, workers: int = 1) -> np.ndarray:
    """``conv(image, G)`` with the approximation kernel (used once for ``approx_bkg``)."""
    spec = image_spectra(image, shape=spectra.shape, workers=workers)[0] * spectra.approx
    out = scipy.fft.irfft2(spec, s=spectra.shape, workers=workers)
    return out[: image.shape[0], : image.shape[1]]


def significance(transform: np.ndarray, error_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Error ``E = sqrt(max(error_sq, 0))`` and significance ``T / E`` (0 where ``E == 0``).

    Pixels with no variance under the kernel are not significant; no NaN or inf is produced.
    """
    error = np.sqrt(np.maximum(error_sq, 0.0))
    sig = np.zeros_like(transform)
    np.divide(transform, error, out=sig, where=error > 0)
    return error, sig


def component_keep(
    sizes: np.ndarray,
    maxima: np.ndarray,
    *,
    remove_isolated: bool,
    island_threshold: float | None,
) -> np.ndarray:
    """Which labelled components survive cleaning (index 0, the background, never does).

    ``sizes`` and ``maxima`` are indexed by label: pixel count and maximum significance.
    """
    keep = np.ones(sizes.shape, dtype=bool)
    keep[0] = False
    if remove_isolated:
        keep &= sizes != 1
    if island_threshold is not None:
        keep &= maxima >= island_threshold
    return keep


def _join_seam(labels: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Merge components touching across the x seam of a longitude-periodic map."""
    left, right = labels[:, 0], labels[:, -1]
    both = (left > 0) & (right > 0)
    if not both.any():
        return labels, n
    graph = coo_matrix((np.ones(both.sum()), (left[both], right[both])), shape=(n + 1, n + 1))
    n_comp, mapping = connected_components(graph, directed=False)
    # keep 0 as background: renumber so the background's component becomes 0
    mapping = mapping - mapping[0]
    mapping[mapping < 0] += n_comp
    return mapping[labels], n_comp - 1


def clean_support(
    sig: np.ndarray,
    threshold: float,
    *,
    remove_isolated: bool,
    island_threshold: float | None,
    wrap_x: bool = False,
) -> np.ndarray:
    """Significant pixels of one scale after component cleaning (spec step 5, before the OR).

    One labelling pass and one pass over the labelled pixels, whatever the number of components.
    """
    mask = sig > threshold
    if not remove_isolated and island_threshold is None:
        return mask
    labels, n = ndimage.label(mask, structure=CROSS)
    if n == 0:
        return mask
    if wrap_x:
        labels, n = _join_seam(labels, n)
    in_mask = labels[mask]
    sizes = np.bincount(in_mask, minlength=n + 1)
    maxima = np.full(n + 1, -np.inf)
    if island_threshold is not None:
        np.maximum.at(maxima, in_mask, sig[mask])
    keep = component_keep(
        sizes, maxima, remove_isolated=remove_isolated, island_threshold=island_threshold
    )
    return keep[labels]


def update_model(
    model: np.ndarray, support: np.ndarray, transform: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``T2 = sum_i S_i * T_i`` and ``M + max(T2, 0)`` (spec step 6)."""
    transform_2d = np.where(support, transform, 0.0).sum(axis=0)
    return transform_2d, model + np.maximum(transform_2d, 0.0)
