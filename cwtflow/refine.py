"""Likelihood refinement of the catalog's candidates: every source fitted on its own window with
the background and its neighbours fixed (`cwtflow.likelihood`), batches through dask.

Sources are fitted together in sweeps (Jacobi): in each sweep every source's window gets, on top
of the background, the current model of every other source reaching into it; all sources are
then refitted at once (vectorised numpy, batches of `BATCH` windows as ``dask.delayed`` tasks,
so that the threads of the scheduler share the work). Two candidates that converge within the
minimum separation are one source (the lower TS is dropped). Then a Gaussian extension is
fitted to every remaining source with its neighbours fixed as point sources (so that an
extension cannot swallow the point sources around it); a source whose extension improves the
likelihood by ``TS_ext >= cwtflow.psf.EXTENDED_TS`` is extended and takes the extended fit's
position and counts. ``ts`` stays the point-source test (detection); the extended model's
TS is about ``ts + ts_ext``. Sources larger than the extension model are the business of
`cwtflow.merge`, which the catalog runs on this module's result.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import dask
import numpy as np

from .likelihood import Fit, fit_sources, source_images
from .psf import EXTENDED_TS

__all__ = [
    "BATCH",
    "N_SWEEPS",
    "POINT_WINDOW",
    "Refined",
    "Windows",
    "max_point_shift",
    "models_on",
    "point_fits",
    "refine",
    "source_exposure",
    "wrapped",
]

#: Windows per dask task.
BATCH = 128
#: Half-width of the point-source fit window, in PSF sigmas.
POINT_WINDOW = 5.0
#: Sweeps of the point-source fits with the neighbour models updated in between.
N_SWEEPS = 3


class Windows(NamedTuple):
    """Square windows of the map, one per source: ``counts``, ``background``, ``exposure``
    (or None) and ``valid`` (k, w, w); ``origin`` (k, 2): map pixel (y, x) of each window's
    first pixel."""

    counts: np.ndarray
    background: np.ndarray
    exposure: np.ndarray | None
    valid: np.ndarray
    origin: np.ndarray


class Refined(NamedTuple):
    """Per-source results (map pixel frame): ``keep`` (bool, the candidates that remain),
    ``x``, ``y``, ``x_err``, ``y_err``, ``counts`` and ``counts_err`` (fitted expected counts),
    ``ts``, ``extension`` and ``extension_err`` (pixels), ``ts_ext``, ``extended``,
    ``exposure`` (model-weighted mean, NaN without exposure), ``converged``."""

    keep: np.ndarray
    x: np.ndarray
    y: np.ndarray
    x_err: np.ndarray
    y_err: np.ndarray
    counts: np.ndarray
    counts_err: np.ndarray
    ts: np.ndarray
    extension: np.ndarray
    extension_err: np.ndarray
    ts_ext: np.ndarray
    extended: np.ndarray
    exposure: np.ndarray
    converged: np.ndarray


def _batched_fit(
    counts: np.ndarray, base: np.ndarray, valid: np.ndarray, start: np.ndarray, **kwargs
) -> Fit:
    k = counts.shape[0]
    if k <= BATCH:
        return fit_sources(counts, base, valid, start, **kwargs)

    def part(i: int) -> dict:
        # per-window arrays among the keywords (the other sources' models) are cut too
        return {
            name: value[i : i + BATCH] if isinstance(value, np.ndarray) else value
            for name, value in kwargs.items()
        }

    tasks = [
        dask.delayed(fit_sources)(
            counts[i : i + BATCH],
            base[i : i + BATCH],
            valid[i : i + BATCH],
            start[i : i + BATCH],
            **part(i),
        )
        for i in range(0, k, BATCH)
    ]
    parts = dask.compute(*tasks, scheduler="threads")
    return Fit(*(np.concatenate([getattr(p, f) for p in parts]) for f in Fit._fields))


def models_on(
    params: np.ndarray,
    sigma: np.ndarray,
    include: np.ndarray,
    origin: np.ndarray,
    size: int,
    period: int | None,
) -> np.ndarray:
    """Expected counts of sources on windows: ``out[w] = sum_j include[w, j] model_j``.

    ``params`` (n, 3) holds each source's (counts, x, y) in the map frame and ``sigma`` (n,)
    its Gaussian sigma (pixels); ``origin`` (m, 2) is each window's first pixel (y, x), its
    side ``size``; across a wrapping x axis (``period``) a source is seen on its nearer side.
    Sources farther than 5 sigma from a window are skipped.
    """
    out = np.zeros((origin.shape[0], size, size))
    x, y = params[:, 1], params[:, 2]
    centre_x = origin[:, 1, None] + size / 2 - 0.5
    centre_y = origin[:, 0, None] + size / 2 - 0.5
    dx = x[None, :] - centre_x
    dx = wrapped(dx, period)
    dy = y[None, :] - centre_y
    reach = size / 2 + 5 * sigma[None, :]
    w, j = np.nonzero(include & (np.abs(dx) < reach) & (np.abs(dy) < reach))
    if w.size == 0:
        return out
    images = source_images(
        params[j, 0], dx[w, j] + size / 2 - 0.5, dy[w, j] + size / 2 - 0.5, sigma[j], (size, size)
    )
    np.add.at(out, w, images)
    return out


def wrapped(dx: np.ndarray | float, period: int | None) -> np.ndarray | float:
    """x offsets ``dx`` taken the short way round a wrapping axis of ``period`` pixels (in
    [-period / 2, period / 2)); unchanged without one."""
    return (dx + period / 2) % period - period / 2 if period else dx


def _neighbour_models(
    params: np.ndarray,
    sigma: np.ndarray,
    alive: np.ndarray,
    origin: np.ndarray,
    size: int,
    period: int | None,
) -> np.ndarray:
    """Sum over the other live sources of their models on each window, (k, size, size)."""
    near = alive[None, :] & alive[:, None]
    np.fill_diagonal(near, False)
    return models_on(params, sigma, near, origin, size, period)


def max_point_shift(psf_sigma: float) -> float:
    """Largest move of a point source's position in one fit (pixels)."""
    return max(2.0 * psf_sigma, 1.5)


def point_fits(
    windows: Windows,
    rows: np.ndarray | slice,
    params: np.ndarray,
    others: np.ndarray,
    psf_sigma: float,
    max_shift: float,
    fit_background: bool,
) -> Fit:
    """Point-source fits of the sources ``rows`` on the cores of their windows (``POINT_WINDOW``
    PSF sigmas around the centre), ``others`` (len(rows), w, w) fixed; ``params`` (a, x, y) in
    and the returned ``params`` out are in the map frame. ``rows`` a slice: no copies."""
    size = windows.counts.shape[1]
    half_point = min(size // 2, math.ceil(POINT_WINDOW * psf_sigma) + 1)
    core = slice(size // 2 - half_point, size // 2 + half_point + 1)
    shift = windows.origin[rows].astype(np.float64)[:, ::-1] + (size // 2 - half_point)
    start = np.array(params, dtype=np.float64)
    start[:, 1:] -= shift
    fit = _batched_fit(
        windows.counts[rows, core, core],
        windows.background[rows, core, core],
        windows.valid[rows, core, core],
        start,
        others=others[:, core, core],
        psf_sigma=psf_sigma,
        max_shift=max_shift,
        fit_background=fit_background,
    )
    out = fit.params[:, :3].copy()
    out[:, 1:] += shift
    return fit._replace(params=out)


def source_exposure(windows: Windows, params: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Exposure averaged with each source's shape on its window (NaN without exposure)."""
    k, size, _ = windows.counts.shape
    if windows.exposure is None:
        return np.full(k, np.nan)
    origin = windows.origin.astype(np.float64)
    shape = source_images(
        np.ones(k), params[:, 1] - origin[:, 1], params[:, 2] - origin[:, 0], sigma, (size, size)
    )
    weight = shape * windows.valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weight * windows.exposure).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))


def refine(
    windows: Windows,
    seeds: np.ndarray,
    psf_sigma: float,
    *,
    min_separation: float,
    max_extension: float,
    fit_extension: bool = True,
    fit_background: bool = True,
    period: int | None = None,
) -> Refined:
    """Fit every candidate (see the module docstring).

    Parameters
    ----------
    windows : Windows
        One window per candidate, centred near its seed; side ``w`` odd.
    seeds : ndarray, shape (k, 3)
        Starting (expected counts, x, y) per candidate, map pixel frame.
    psf_sigma : float
        Gaussian PSF sigma (pixels).
    min_separation : float
        Candidates converging closer than this (pixels) are one source.
    max_extension : float
        Largest fitted extension sigma (pixels).
    fit_extension : bool
        Fit the Gaussian extension (else every source is a point source).
    fit_background : bool
        Fit a local scale of the background model on every window (with and without the
        source; `cwtflow.likelihood.fit_sources`).
    period : int, optional
        Map width when x wraps around (all-sky maps).
    """
    k, size, _ = windows.counts.shape
    origin = windows.origin.astype(np.float64)
    params = np.array(seeds, dtype=np.float64)  # (a, x, y) map frame
    alive = np.ones(k, dtype=bool)
    max_shift = max_point_shift(psf_sigma)
    psf = np.full(k, psf_sigma)
    for _ in range(N_SWEEPS):
        others = _neighbour_models(params, psf, alive, origin, size, period)
        point = point_fits(
            windows, slice(None), params, others, psf_sigma, max_shift, fit_background
        )
        params = point.params
        alive &= _unique(params, point.ts, alive, min_separation, period)
    ts, cov, converged = point.ts, point.cov[:, :3, :3], point.converged
    ts_ext = np.zeros(k)
    extended = np.zeros(k, dtype=bool)
    extension = np.zeros(k)
    extension_err = np.zeros(k)
    sigma = psf.copy()
    todo = np.flatnonzero(alive)
    if fit_extension and todo.size:
        # each source's extension with its neighbours fixed as point sources: a Gaussian
        # extension may not swallow the point sources around it
        local = params[todo].copy()
        local[:, 1:] -= origin[todo][:, ::-1]
        common = {
            "others": others[todo],
            "psf_sigma": psf_sigma,
            "max_shift": max_shift,
            "fit_background": fit_background,
        }
        # the point model refitted on the whole window, for a like-for-like TS_ext
        whole = _batched_fit(
            windows.counts[todo], windows.background[todo], windows.valid[todo], local, **common
        )
        start = np.column_stack([whole.params[:, :3], np.full(todo.size, 0.25 * psf_sigma**2)])
        ext_fit = _batched_fit(
            windows.counts[todo],
            windows.background[todo],
            windows.valid[todo],
            start,
            extended=True,
            max_extension=max_extension,
            **common,
        )
        ll_point = whole.loglike
        gain = np.maximum(2.0 * (ext_fit.loglike - ll_point), 0.0)
        ext = gain >= EXTENDED_TS
        ts_ext[todo] = gain
        extended[todo] = ext
        v = ext_fit.params[:, 3]
        v_err = np.sqrt(np.maximum(ext_fit.cov[:, 3, 3], 0.0))
        extension[todo] = np.sqrt(np.maximum(v, 0.0))
        # the 1-sigma interval of v = extension^2 mapped onto the extension
        lo, hi = np.sqrt(np.maximum(v - v_err, 0.0)), np.sqrt(np.maximum(v + v_err, 0.0))
        extension_err[todo] = 0.5 * (hi - lo)
        idx = todo[ext]
        fitted = ext_fit.params[ext, :3].copy()
        fitted[:, 1:] += origin[idx][:, ::-1]
        params[idx] = fitted
        cov = cov.copy()
        cov[idx] = ext_fit.cov[ext, :3, :3]
        converged = converged.copy()
        converged[idx] = ext_fit.converged[ext]
        sigma[idx] = np.sqrt(psf_sigma**2 + v[ext])
    err = np.sqrt(np.maximum(np.einsum("kpp->kp", cov), 0.0))
    exposure = source_exposure(windows, params, sigma)
    return Refined(
        keep=alive,
        x=params[:, 1] % period if period else params[:, 1],
        y=params[:, 2],
        x_err=err[:, 1],
        y_err=err[:, 2],
        counts=params[:, 0],
        counts_err=err[:, 0],
        ts=ts,
        extension=extension,
        extension_err=extension_err,
        ts_ext=ts_ext,
        extended=extended,
        exposure=exposure,
        converged=np.asarray(converged, dtype=bool),
    )


def _unique(
    params: np.ndarray, ts: np.ndarray, alive: np.ndarray, min_separation: float, period
) -> np.ndarray:
    """False for every live source within ``min_separation`` of a live one of higher TS."""
    keep = alive.copy()
    order = np.argsort(-np.where(alive, ts, -np.inf), kind="stable")
    x, y = params[:, 1], params[:, 2]
    for n, i in enumerate(order):
        if not keep[i]:
            continue
        rest = order[n + 1 :]
        dx = wrapped(x[rest] - x[i], period)
        close = np.hypot(dx, y[rest] - y[i]) < min_separation
        keep[rest[close]] = False
    return keep
