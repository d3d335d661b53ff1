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
   counts-weighted centre, fitted with the members left out and every other source fixed
   (the first L of every tried source in one vectorised fit; redone for a source whose window
   an earlier merge changed); sources within two of L's sigmas join the members and L is
   refitted (``GROW_ROUNDS`` at most). An L not larger than the extension model allows (see 4)
   ends the try here: with the members refitted on top it would only shrink;
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
from .refine import Refined, Windows, models_on, point_fits, source_exposure, wrapped

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
        dx = wrapped(self.params[:, 1] - x, period)
        return self.alive & (np.hypot(dx, self.params[:, 2] - y) < radius)


class _Window:
    """Large windows (a batch of k): their data and conversions between the map's frame and
    theirs; parameters are (k, p) arrays ``(a, x, y, ...)``."""

    def __init__(self, large: Windows, index: slice, period: int | None) -> None:
        self.counts = large.counts[index]
        self.background = large.background[index]
        self.valid = large.valid[index]
        self.exposure = None if large.exposure is None else large.exposure[index]
        self.origin = large.origin[index].astype(np.float64)
        self.size = self.counts.shape[1]
        self.period = period

    def local(self, params: np.ndarray) -> np.ndarray:
        """Map frame -> window frame (x on the window's side of the seam)."""
        out = np.array(params, dtype=np.float64)
        half = self.size / 2 - 0.5
        out[:, 1] = wrapped(out[:, 1] - self.origin[:, 1] - half, self.period) + half
        out[:, 2] -= self.origin[:, 0]
        return out

    def to_map(self, params: np.ndarray) -> np.ndarray:
        out = np.array(params, dtype=np.float64)
        out[:, 1] += self.origin[:, 1]
        out[:, 2] += self.origin[:, 0]
        return out

    def models(self, params: np.ndarray, sigma: np.ndarray, include: np.ndarray) -> np.ndarray:
        """The sources ``include`` (k, n) selects, on each window."""
        return models_on(params, sigma, include, self.origin, self.size, self.period)

    def loglike(self, models: np.ndarray, fit_background: bool) -> np.ndarray:
        """log L of the counts given ``models`` (k, s, s) on top of the background."""
        beta = 1.0
        if fit_background:
            beta = background_scale(self.counts, self.background, models, self.valid)[:, None, None]
        return poisson_loglike(self.counts, beta * self.background + models, self.valid)

    def fit(self, start: np.ndarray, others: np.ndarray, psf_sigma: float, **kwargs) -> Fit:
        return fit_sources(
            self.counts,
            self.background,
            self.valid,
            self.local(start),
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
    if len(rows) == 0:
        return fit
    sources = _Sources(fit, psf_sigma)
    extended = {
        "extended": True,
        "max_extension": large_extension,
        "fit_background": fit_background,
    }
    # every source's first L, all windows at once (vectorised); a try redoes its own only if
    # an earlier merge changed the sources in its window
    everything = _Window(large, slice(None), period)
    groups = np.array([_footprint(sources, i, period) for i in rows])
    first = everything.fit(
        np.array([_start(sources, i, g, period) for i, g in zip(rows, groups, strict=True)]),
        everything.models(sources.params, sources.sigma, sources.alive & ~groups),
        psf_sigma,
        **extended,
    )
    settings = {
        "psf_sigma": psf_sigma,
        "large_extension": large_extension,
        "min_extension": min_extension,
        "min_ts": min_ts,
        "max_shift": max_shift,
        "extended": extended,
    }
    for n, i in enumerate(rows):
        if not sources.alive[i] or sources.merged[i]:
            continue  # absorbed or refitted by an earlier merge
        window = _Window(large, slice(n, n + 1), period)
        reach = np.abs(window.local(sources.params)[:, 1:3] - window.size / 2).max(axis=1)
        fresh = not np.any(sources.merged & (reach < window.size / 2 + 5 * sources.sigma))
        if fresh:
            own, group = Fit(*(a[n : n + 1] for a in first)), groups[n]
        else:
            own, group = None, _footprint(sources, int(i), period)
        _try(sources, windows, window, int(i), group, own, **settings)
    return Refined(**sources.columns)


def _footprint(sources: _Sources, i: int, period: int | None) -> np.ndarray:
    """Source ``i`` and the live sources within two of its sigmas."""
    group = sources.near(sources.params[i, 1], sources.params[i, 2], 2.0 * sources.sigma[i], period)
    group[i] = True
    return group


def _start(sources: _Sources, i: int, group: np.ndarray, period: int | None) -> np.ndarray:
    """L's start: the group's summed counts at its counts-weighted centre, sigma twice i's."""
    params = sources.params
    weight = params[group, 0]
    dx = wrapped(params[group, 1] - params[i, 1], period)
    return np.array(
        [
            weight.sum(),
            params[i, 1] + np.average(dx, weights=weight),
            np.average(params[group, 2], weights=weight),
            (2.0 * sources.sigma[i]) ** 2,
        ]
    )


def _try(
    sources: _Sources,
    windows: Windows,
    window: _Window,
    i: int,
    group: np.ndarray,
    first: Fit | None,
    *,
    psf_sigma: float,
    large_extension: float,
    min_extension: float,
    min_ts: float,
    max_shift: float,
    extended: dict,
) -> None:
    """Source ``i`` (footprint ``group``) as part of L on ``window`` (``first``: L's first fit
    if still valid); the sources are updated in place if the merge is accepted."""
    params, sigma, alive = sources.params, sources.sigma, sources.alive
    period = window.period
    fit_background = extended["fit_background"]
    big = first
    for round_ in range(GROW_ROUNDS):
        if big is None:
            start = _start(sources, i, group, period)[None, :]
            big = window.fit(
                start, window.models(params, sigma, alive & ~group), psf_sigma, **extended
            )
        if not _larger(big, min_extension, large_extension):
            return  # the members refitted on top would only shrink L: nothing to gain
        lx = window.to_map(big.params[:, :4])[0]
        s_large = math.hypot(psf_sigma, math.sqrt(lx[3]))
        joining = sources.near(lx[1], lx[2], 2.0 * s_large, period) & ~group
        if not joining.any() or round_ == GROW_ROUNDS - 1:
            break
        group = group | joining
        big = None
    members = group.copy()
    members[i] = False
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
        others = window.models(pool, pool_sigma, np.concatenate([fixed, m_alive])[None, :])
        big = window.fit(lx[None, :], others, psf_sigma, **extended)
        lx = window.to_map(big.params[:, :4])[0]
        s_large = math.hypot(psf_sigma, math.sqrt(lx[3]))
    local = window.local(lx[None, :])[0]
    image = source_images(
        local[:1], local[1:2], local[2:3], np.array([s_large]), (window.size,) * 2
    )
    after = float(window.loglike(others + image, fit_background)[0])
    before = float(window.loglike(window.models(params, sigma, alive[None, :]), fit_background)[0])
    k_before = int(np.sum(3 + sources.columns["extended"][group]))  # i and the members
    k_after = 4 + 3 * int(m_alive.sum())
    point = window.fit(lx[None, :3], others, psf_sigma, fit_background=fit_background)
    if not (
        _larger(big, min_extension, large_extension)
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
    extension, extension_err = _extension(big)
    err = np.sqrt(np.maximum(np.diag(big.cov[0])[:3], 0.0))
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
        "exposure": source_exposure(
            Windows(window.counts, window.background, window.exposure, window.valid, window.origin),
            window.to_map(local[None, :3]),  # the frame of the window's origin
            np.array([s_large]),
        )[0],
    }
    for name, value in updates.items():
        columns[name][i] = value


def _extension(fit: Fit) -> tuple[float, float]:
    """The extension of a one-window extended fit and its error (the 1-sigma interval of
    ``v = extension^2`` mapped onto the extension, as `cwtflow.refine` does)."""
    v, v_err = fit.params[0, 3], math.sqrt(max(fit.cov[0, 3, 3], 0.0))
    return math.sqrt(v), 0.5 * (math.sqrt(v + v_err) - math.sqrt(max(v - v_err, 0.0)))


def _larger(fit: Fit, min_extension: float, large_extension: float) -> bool:
    """L is larger than the extension model allows (by more than its error) and smaller than
    its own limit. NaN errors (a singular fit) fail."""
    extension, error = _extension(fit)
    return bool(extension - error > min_extension and extension < AT_CAP * large_extension)


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
