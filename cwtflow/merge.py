"""Sources larger than the extension model: one large Gaussian instead of its fragments.

The catalog's extension fit (`cwtflow.refine`) lets a source's intrinsic Gaussian sigma grow
to ``MAX_EXTENSION_PER_SIGMA`` PSF sigmas, with its neighbours fixed. A source larger than that
is found as several components around its centre: extended ones at that cap and point sources
on its flanks, each a false detection (``benchmarks/catalog_diagnosis/large_extended.py``). For
every source whose extension reached the cap (``AT_CAP``), this module tries a larger model on
a larger window (half-width `large_window_half`, cut by the caller):

1. *members*: the live sources within two sigmas of the capped source (its footprint);
2. *L*: a Gaussian of extension up to ``LARGE_EXTENSION_PER_SIGMA`` PSF sigmas
   (`cwtflow.psf`), started from the capped source and its members' summed counts at their
   counts-weighted centre, fitted with the members left out and every other source fixed;
   sources within two of L's sigmas join the members and L is refitted, until none join;
3. sweeps (``N_SWEEPS``): the members refitted as point sources on their own windows on top of
   L and the other sources, those whose TS falls below ``min_ts`` dropped (fragments), then L
   refitted on top of the survivors;
4. the merged configuration (L and the surviving members) replaces the original one (the
   capped source and every member as fitted before) when all of these hold:

   - Akaike's criterion prefers it on L's window: ``log L_merged - log L_original >=
     k_merged - k_original`` (k: free parameters; ``PARAMETER_COST`` per parameter);
   - L's extension is beyond the cap by more than its error (the data show a source larger
     than the model allows; else the original model stands);
   - L's extension stays below ``AT_CAP`` of its own limit (at that limit the emission is
     larger than any model tried, and is left as it was);
   - L is still detected: its point-source ``ts`` at its position reaches ``min_ts`` (a merge
     re-describes a detection, it never removes one).

A merged source is reported as an extended source with the catalog's usual definitions: ``ts``
the point-source test at its position on its window (the survivors fixed; the extended
model's TS would be larger, but it is not the test the threshold was calibrated on: on
simulations whose background model is off by 10 % it turned structure of the model's error
into detections), ``ts_ext`` the extension's gain over that point source. The effect on
simulations is in ``docs/psf_rule.md``.
"""

from __future__ import annotations

import math

import numpy as np

from .likelihood import Fit, background_scale, fit_sources, poisson_loglike, source_images
from .psf import EXTENDED_TS
from .refine import Refined, Windows, models_on, point_fits, source_exposure

__all__ = ["AT_CAP", "N_SWEEPS", "large_window_half", "merge_large"]

#: A source is tried as part of a larger one when its extension reaches this fraction of the cap.
AT_CAP = 0.95
#: Sweeps of member refits and L refits.
N_SWEEPS = 3
#: Rounds in which the sources within L's footprint join its members.
GROW_ROUNDS = 3
#: Log-likelihood worth one free parameter in the choice between the configurations (Akaike).
PARAMETER_COST = 1.0


def large_window_half(psf_sigma: float, large_extension: float) -> int:
    """Half-width (pixels) of the window on which a large source is fitted."""
    return math.ceil(3.0 * math.hypot(psf_sigma, large_extension)) + 1


def _wrapped(dx: np.ndarray | float, period: int | None):
    return (dx + period / 2) % period - period / 2 if period else dx


class _Sources:
    """The catalog's sources as arrays (map frame), updated merge by merge."""

    def __init__(self, fit: Refined, psf_sigma: float) -> None:
        self.params = np.column_stack([fit.counts, fit.x, fit.y])
        self.sigma = np.where(fit.extended, np.hypot(psf_sigma, fit.extension), psf_sigma)
        self.columns = {name: np.array(getattr(fit, name)) for name in Refined._fields}
        self.merged = np.zeros(self.params.shape[0], dtype=bool)

    @property
    def alive(self) -> np.ndarray:
        return self.columns["keep"]

    def near(self, x: float, y: float, radius: float, period: int | None) -> np.ndarray:
        dx = _wrapped(self.params[:, 1] - x, period)
        return self.alive & (np.hypot(dx, self.params[:, 2] - y) < radius)


class _Window:
    """One large window: its data (batch of one) and conversions to and from the map frame."""

    def __init__(self, large: Windows, n: int, period: int | None) -> None:
        self.counts = large.counts[n : n + 1]
        self.background = large.background[n : n + 1]
        self.valid = large.valid[n : n + 1]
        self.exposure = None if large.exposure is None else large.exposure[n : n + 1]
        self.origin = large.origin[n : n + 1].astype(np.float64)
        self.size = self.counts.shape[1]
        self.period = period

    def local(self, params: np.ndarray) -> np.ndarray:
        """(a, x, y, ...) map frame -> window frame (x on the window's side of the seam)."""
        out = np.array(params, dtype=np.float64)
        half = self.size / 2 - 0.5
        out[1] = _wrapped(out[1] - self.origin[0, 1] - half, self.period) + half
        out[2] -= self.origin[0, 0]
        return out

    def to_map(self, params: np.ndarray) -> np.ndarray:
        out = np.array(params, dtype=np.float64)
        out[1] += self.origin[0, 1]
        out[2] += self.origin[0, 0]
        return out

    def models(self, params: np.ndarray, sigma: np.ndarray, include: np.ndarray) -> np.ndarray:
        return models_on(params, sigma, include[None, :], self.origin, self.size, self.period)

    def loglike(self, models: np.ndarray, fit_background: bool) -> float:
        """log L of the counts given ``models`` (1, s, s) on top of the background."""
        beta = 1.0
        if fit_background:
            beta = background_scale(self.counts, self.background, models, self.valid)[:, None, None]
        return float(poisson_loglike(self.counts, beta * self.background + models, self.valid)[0])

    def fit(self, start: np.ndarray, others: np.ndarray, psf_sigma: float, **kwargs) -> Fit:
        return fit_sources(
            self.counts,
            self.background,
            self.valid,
            self.local(start)[None, :],
            psf_sigma,
            others=others,
            max_shift=self.size / 4,
            **kwargs,
        )


def merge_large(
    fit: Refined,
    windows: Windows,
    large: Windows,
    rows: np.ndarray,
    psf_sigma: float,
    *,
    large_extension: float,
    min_extension: float,
    min_ts: float,
    max_shift: float,
    fit_background: bool = False,
    period: int | None = None,
) -> Refined:
    """Try every source of ``rows`` (at the extension cap) as part of a larger one; see the
    module docstring.

    Parameters
    ----------
    fit : Refined
        `cwtflow.refine.refine`'s result for all candidates.
    windows : Windows
        The candidates' windows given to `refine` (the members' refits use them).
    large : Windows
        One large window (side ``2 large_window_half + 1``) per entry of ``rows``, centred on
        that source.
    rows : ndarray of int
        The sources to try, in order (highest TS first).
    psf_sigma, large_extension : float
        PSF sigma and the largest extension of L (pixels).
    min_extension : float
        L replaces the original sources only if its extension ends above this (the extension
        model's cap, pixels): else the original model already covered the source.
    min_ts : float
        Members whose TS on top of L falls below this are fragments.
    max_shift : float
        Largest move of a member's position in one refit (pixels).
    fit_background, period
        As for `cwtflow.refine.refine`.
    """
    sources = _Sources(fit, psf_sigma)
    settings = {
        "psf_sigma": psf_sigma,
        "large_extension": large_extension,
        "min_extension": min_extension,
        "min_ts": min_ts,
        "max_shift": max_shift,
        "fit_background": fit_background,
    }
    for n, i in enumerate(rows):
        if sources.alive[i] and not sources.merged[i]:  # not changed by an earlier merge
            _try(sources, windows, _Window(large, n, period), int(i), **settings)
    return Refined(**sources.columns)


def _try(
    sources: _Sources,
    windows: Windows,
    window: _Window,
    i: int,
    *,
    psf_sigma: float,
    large_extension: float,
    min_extension: float,
    min_ts: float,
    max_shift: float,
    fit_background: bool,
) -> None:
    params, sigma, alive = sources.params, sources.sigma, sources.alive
    period = window.period
    extended = {
        "extended": True,
        "max_extension": large_extension,
        "fit_background": fit_background,
    }
    members = sources.near(params[i, 1], params[i, 2], 2.0 * sigma[i], period)
    members[i] = False
    for _ in range(GROW_ROUNDS):
        group = members.copy()
        group[i] = True
        weight = params[group, 0]
        dx = _wrapped(params[group, 1] - params[i, 1], period)
        start = np.array(
            [
                weight.sum(),
                params[i, 1] + np.average(dx, weights=weight),
                np.average(params[group, 2], weights=weight),
                (2.0 * sigma[i]) ** 2,
            ]
        )
        big = window.fit(start, window.models(params, sigma, alive & ~group), psf_sigma, **extended)
        lx = window.to_map(big.params[0, :4])
        s_large = math.hypot(psf_sigma, math.sqrt(lx[3]))
        joining = sources.near(lx[1], lx[2], 2.0 * s_large, period) & ~group
        if not joining.any():
            break
        members |= joining
    rows = np.flatnonzero(members)
    fixed = alive & ~members
    fixed[i] = False
    m_params = params[rows].copy()
    m_alive = np.ones(rows.size, dtype=bool)
    m_fit: Fit | None = None
    n = alive.size
    for _ in range(N_SWEEPS):
        if rows.size:
            # each member on its own window, on top of L, the fixed sources and the other members
            pool = np.vstack([params, m_params, lx[None, :3]])
            pool_sigma = np.concatenate([sigma, np.full(rows.size, psf_sigma), [s_large]])
            include = np.zeros((rows.size, n + rows.size + 1), dtype=bool)
            include[:, :n] = fixed
            include[:, n:-1] = m_alive & ~np.eye(rows.size, dtype=bool)
            include[:, -1] = True
            others = models_on(
                pool, pool_sigma, include, windows.origin[rows], windows.counts.shape[1], period
            )
            m_fit = point_fits(
                windows, rows, m_params, others, psf_sigma, max_shift, fit_background
            )
            m_params = m_fit.params
            m_alive &= m_fit.ts >= min_ts
        pool = np.vstack([params, m_params])
        pool_sigma = np.concatenate([sigma, np.full(rows.size, psf_sigma)])
        others = window.models(pool, pool_sigma, np.concatenate([fixed, m_alive]))
        big = window.fit(lx, others, psf_sigma, **extended)
        lx = window.to_map(big.params[0, :4])
        s_large = math.hypot(psf_sigma, math.sqrt(lx[3]))
    local = window.local(lx)
    image = source_images(
        local[:1], local[1:2], local[2:3], np.array([s_large]), (window.size,) * 2
    )
    after = window.loglike(others + image, fit_background)
    before = window.loglike(window.models(params, sigma, alive), fit_background)
    k_before = 4 + int(np.sum(3 + sources.columns["extended"][rows]))
    k_after = 4 + 3 * int(m_alive.sum())
    point = window.fit(lx[:3], others, psf_sigma, fit_background=fit_background)
    cov = big.cov[0]
    v, v_err = lx[3], math.sqrt(max(cov[3, 3], 0.0))
    extension = math.sqrt(v)
    extension_err = 0.5 * (math.sqrt(v + v_err) - math.sqrt(max(v - v_err, 0.0)))
    if not (
        extension - extension_err > min_extension  # larger than the extension model allows
        and extension < AT_CAP * large_extension  # and not larger than L may be
        and point.ts[0] >= min_ts  # the source is still detected
        and after - before >= PARAMETER_COST * (k_after - k_before)
    ):
        return
    # accepted: the members' new state, then L in the capped source's row
    columns = sources.columns
    columns["keep"][rows] = m_alive
    sources.merged[rows] = True
    sources.merged[i] = True
    if m_fit is not None:
        _set_points(sources, windows, rows[m_alive], m_fit, m_alive, psf_sigma, period)
    sources.params[i] = lx[:3]
    sources.sigma[i] = s_large
    err = np.sqrt(np.maximum(np.diag(cov)[:3], 0.0))
    ts_ext = max(2.0 * float(big.loglike[0] - point.loglike[0]), 0.0)
    updates = {
        "x": lx[1] % period if period else lx[1],
        "y": lx[2],
        "x_err": err[1],
        "y_err": err[2],
        "counts": lx[0],
        "counts_err": err[0],
        "ts": float(point.ts[0]),
        "extension": extension,
        "extension_err": extension_err,
        "ts_ext": ts_ext,
        "extended": ts_ext >= EXTENDED_TS,
        "converged": bool(big.converged[0]),
    }
    if window.exposure is not None:
        weight = image * window.valid
        updates["exposure"] = float((weight * window.exposure).sum() / weight.sum())
    for name, value in updates.items():
        columns[name][i] = value


def _set_points(
    sources: _Sources,
    windows: Windows,
    rows: np.ndarray,
    fit: Fit,
    alive: np.ndarray,
    psf_sigma: float,
    period: int | None,
) -> None:
    """The surviving members ``rows`` become the point sources of ``fit`` (selected by
    ``alive``)."""
    params = fit.params[alive]
    err = np.sqrt(np.maximum(np.einsum("kpp->kp", fit.cov[alive][:, :3, :3]), 0.0))
    sources.params[rows] = params
    sources.sigma[rows] = psf_sigma
    part = Windows(*(None if w is None else w[rows] for w in windows))
    columns = sources.columns
    updates = {
        "x": params[:, 1] % period if period else params[:, 1],
        "y": params[:, 2],
        "x_err": err[:, 1],
        "y_err": err[:, 2],
        "counts": params[:, 0],
        "counts_err": err[:, 0],
        "ts": fit.ts[alive],
        "extension": 0.0,
        "extension_err": 0.0,
        "ts_ext": 0.0,
        "extended": False,
        "converged": fit.converged[alive],
        "exposure": source_exposure(part, params, np.full(rows.size, psf_sigma)),
    }
    for name, value in updates.items():
        columns[name][rows] = value
