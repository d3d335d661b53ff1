"""Poisson likelihood fit of point and extended sources on cut-outs (pure numpy/scipy).

Every source has its own square window of the map (counts C, the background model B, the
fixed models O of the other sources, and a mask of the pixels inside the map). The source is a
circular Gaussian integrated over each pixel,

    mu = beta B + O + a G(x, y; s),  G = g_x (x) g_y,
    g_i = Phi((i + 1/2 - x)/s) - Phi((i - 1/2 - x)/s),

with ``a`` its expected counts, ``(x, y)`` its position in the window's pixels and
``s = sqrt(psf_sigma^2 + v)`` where ``v = extension^2`` (``v = 0`` for a point source). The fit
maximises ``log L = sum(C ln mu - mu)`` over the window (Cash 1979) by Fisher scoring with
Levenberg-Marquardt damping and analytic derivatives, all sources of a batch at once
(vectorised over a leading axis). Errors are the inverse Fisher information
``I = sum(J J^T / mu)`` at the maximum (Cramér-Rao; J the model's derivatives), which for
Poisson data is the expected curvature of ``-log L``; ``TS = 2 (log L - log L_0)`` against the
null ``mu_0 = beta_0 B + O`` (``beta_0`` refitted without the source).

``docs/psf_rule.md`` shows the errors calibrated on simulations (pulls).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import ndtr

__all__ = [
    "Fit",
    "background_scale",
    "fit_sources",
    "gaussian_profiles",
    "poisson_loglike",
    "source_images",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_FLOOR = 1e-10  # expected counts below this count as this (pixels without any background)


def gaussian_profiles(
    centre: np.ndarray, sigma: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated unit 1-D Gaussians on pixels ``0 .. n-1`` and their derivatives.

    Parameters
    ----------
    centre, sigma : ndarray, shape (k,)
        Centres (pixels; pixel i spans i - 1/2 .. i + 1/2) and sigmas (pixels, > 0).
    n : int
        Pixels along the axis.

    Returns
    -------
    g, dg_dcentre, dg_dsigma : ndarray, shape (k, n)
    """
    i = np.arange(n, dtype=np.float64)[None, :]
    s = sigma[:, None]
    upper = (i + 0.5 - centre[:, None]) / s
    lower = (i - 0.5 - centre[:, None]) / s
    pu = _INV_SQRT_2PI * np.exp(-0.5 * upper * upper)
    pl = _INV_SQRT_2PI * np.exp(-0.5 * lower * lower)
    g = ndtr(upper) - ndtr(lower)
    return g, (pl - pu) / s, -(upper * pu - lower * pl) / s


def source_images(
    amplitude: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Expected counts of Gaussian sources on windows of ``shape`` (k, ny, nx)."""
    gx, _, _ = gaussian_profiles(x, sigma, shape[1])
    gy, _, _ = gaussian_profiles(y, sigma, shape[0])
    return amplitude[:, None, None] * gy[:, :, None] * gx[:, None, :]


class Fit(NamedTuple):
    """Best fit of a batch of k sources: ``params`` (k, p) = (a, x, y[, v][, beta]), their
    covariance
    (k, p, p), the maximum ``loglike`` and the null ``loglike0`` (k,), and whether the
    iteration ``converged`` (k,)."""

    params: np.ndarray
    cov: np.ndarray
    loglike: np.ndarray
    loglike0: np.ndarray
    converged: np.ndarray

    @property
    def ts(self) -> np.ndarray:
        """``2 (log L - log L_0)`` (>= 0)."""
        return np.maximum(2.0 * (self.loglike - self.loglike0), 0.0)


def _model(
    params: np.ndarray,
    background: np.ndarray,
    others: np.ndarray,
    psf_sigma: float,
    extended: bool,
    jacobian: bool,
    scaled: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    k, ny, nx = background.shape
    a, x, y = params[:, 0], params[:, 1], params[:, 2]
    v = params[:, 3] if extended else np.zeros(k)
    s = np.sqrt(psf_sigma * psf_sigma + v)
    gx, dgx, sgx = gaussian_profiles(x, s, nx)
    gy, dgy, sgy = gaussian_profiles(y, s, ny)
    shape = gy[:, :, None] * gx[:, None, :]
    beta = params[:, -1][:, None, None] if scaled else 1.0
    mu = beta * background + others + a[:, None, None] * shape
    if not jacobian:
        return mu, None
    p = params.shape[1]
    jac = np.empty((k, p, ny, nx))
    if scaled:
        jac[:, -1] = background
    jac[:, 0] = shape
    jac[:, 1] = a[:, None, None] * gy[:, :, None] * dgx[:, None, :]
    jac[:, 2] = a[:, None, None] * dgy[:, :, None] * gx[:, None, :]
    if extended:
        ds = gy[:, :, None] * sgx[:, None, :] + sgy[:, :, None] * gx[:, None, :]
        jac[:, 3] = (a / (2.0 * s))[:, None, None] * ds
    return mu, jac


def poisson_loglike(counts: np.ndarray, mu: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``sum(C ln mu - mu)`` over the valid pixels of each window (k,)."""
    mu = np.maximum(mu, _FLOOR)
    return np.sum(np.where(valid, counts * np.log(mu) - mu, 0.0), axis=(1, 2))


def _clip(params: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(params, lower), upper)


def background_scale(
    counts: np.ndarray, background: np.ndarray, others: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """Best background scale without the source: ``max_beta sum(C ln(beta b + o) - beta b)``
    (concave; safeguarded Newton steps from the moment estimate)."""
    w = valid.astype(np.float64)
    b_sum = np.sum(w * background, axis=(1, 2))
    c_sum = np.sum(w * counts, axis=(1, 2))
    o_sum = np.sum(w * others, axis=(1, 2))
    beta = np.clip((c_sum - o_sum) / np.maximum(b_sum, _FLOOR), 0.05, 20.0)
    for _ in range(30):
        mu = np.maximum(beta[:, None, None] * background + others, _FLOOR)
        g = np.sum(w * (counts / mu - 1.0) * background, axis=(1, 2))
        h = -np.sum(w * counts * background**2 / mu**2, axis=(1, 2))
        step = np.where(h < 0, -g / np.minimum(h, -_FLOOR), 0.0)
        beta = np.clip(beta + step, 0.5 * beta, 2.0 * beta)
        beta = np.clip(beta, 1e-3, 1e3)
        if np.all(np.abs(step) <= 1e-8 * beta):
            break
    return beta


def fit_sources(
    counts: np.ndarray,
    background: np.ndarray,
    valid: np.ndarray,
    start: np.ndarray,
    psf_sigma: float,
    *,
    others: np.ndarray | None = None,
    fit_background: bool = False,
    extended: bool = False,
    max_shift: float,
    max_extension: float = 0.0,
    max_iter: int = 40,
) -> Fit:
    """Maximum-likelihood amplitude, position (and extension) of one source per window.

    Parameters
    ----------
    counts, background : ndarray, shape (k, ny, nx)
        Observed counts and the background model per window.
    valid : ndarray of bool, shape (k, ny, nx)
        Pixels that count (inside the map).
    start : ndarray, shape (k, 3) or (k, 4)
        Starting ``(a, x, y[, v])``: expected counts, window pixel position, extension squared
        (pixels^2).
    psf_sigma : float
        Gaussian PSF sigma (pixels).
    others : ndarray, shape (k, ny, nx), optional
        Fixed expected counts of the other sources on each window.
    fit_background : bool
        Also fit a scale ``beta`` of ``background`` on the window (the last parameter), with
        and without the source: a diffuse model that is locally off by a factor does not make
        a source. Without it ``beta = 1``.
    extended : bool
        Fit ``v`` (a Gaussian extension) too.
    max_shift : float
        The position stays within this many pixels of its start.
    max_extension : float
        Largest extension sigma (pixels) when ``extended``.
    max_iter : int
        Fisher-scoring iterations at most.
    """
    counts = np.asarray(counts, dtype=np.float64)
    background = np.maximum(np.asarray(background, dtype=np.float64), 0.0)
    others = np.zeros_like(counts) if others is None else np.maximum(others, 0.0)
    k = counts.shape[0]
    p = 3 + int(extended)
    theta = np.array(start, dtype=np.float64)[:, :p].copy()
    if theta.shape[1] < p:
        theta = np.column_stack([theta, np.full(k, 0.25 * psf_sigma**2)])
    n_total = np.sum(np.where(valid, counts, 0.0), axis=(1, 2))
    lower = np.column_stack([np.full(k, 1e-3), theta[:, 1] - max_shift, theta[:, 2] - max_shift])
    upper = np.column_stack(
        [np.maximum(2.0 * n_total + 10.0, 1.0), theta[:, 1] + max_shift, theta[:, 2] + max_shift]
    )
    if extended:
        lower = np.column_stack([lower, np.zeros(k)])
        upper = np.column_stack([upper, np.full(k, max_extension**2)])
    if fit_background:
        beta0 = background_scale(counts, background, others, valid)
        theta = np.column_stack([theta, beta0])
        lower = np.column_stack([lower, np.full(k, 1e-3)])
        upper = np.column_stack([upper, np.full(k, 1e3)])
        loglike0 = poisson_loglike(counts, beta0[:, None, None] * background + others, valid)
    else:
        loglike0 = poisson_loglike(counts, background + others, valid)
    p = theta.shape[1]
    theta = _clip(theta, lower, upper)

    def model(th, idx, jacobian):
        return _model(
            th, background[idx], others[idx], psf_sigma, extended, jacobian, fit_background
        )

    everything = np.arange(k)
    mu, _ = model(theta, everything, False)
    loglike = poisson_loglike(counts, mu, valid)
    damping = np.full(k, 1e-3)
    converged = np.zeros(k, dtype=bool)
    eye = np.eye(p)
    weight = valid.astype(np.float64)
    for _ in range(max_iter):
        active = ~converged
        if not active.any():
            break
        idx = np.flatnonzero(active)
        th = theta[idx]
        mu, jac = model(th, idx, True)
        mu = np.maximum(mu, _FLOOR)
        w = weight[idx]
        jf = jac.reshape(idx.size, p, -1)
        resid = (w * (counts[idx] / mu - 1.0)).reshape(idx.size, -1)
        grad = np.matmul(jf, resid[:, :, None])[:, :, 0]
        info = np.matmul(jf * (w / mu).reshape(idx.size, 1, -1), jf.transpose(0, 2, 1))
        diag = np.einsum("kpp->kp", info)
        lhs = info + damping[idx, None, None] * diag[:, :, None] * eye + 1e-12 * eye
        step = np.linalg.solve(lhs, grad[:, :, None])[:, :, 0]
        trial = _clip(th + step, lower[idx], upper[idx])
        mu_t, _ = model(trial, idx, False)
        ll_t = poisson_loglike(counts[idx], mu_t, valid[idx])
        better = ll_t >= loglike[idx]
        gain = ll_t - loglike[idx]
        theta[idx[better]] = trial[better]
        loglike[idx[better]] = ll_t[better]
        damping[idx] = np.where(better, np.maximum(damping[idx] * 0.2, 1e-9), damping[idx] * 10.0)
        moved = np.abs(trial - th)
        # converged: log L changes by less than 1e-5 and no parameter by more than 1e-4 of
        # its size (positions: 1e-4 px), far below the statistical errors
        small = np.all(moved <= 1e-4 * np.maximum(np.abs(th), 1.0), axis=1)
        done = (better & (gain < 1e-5) & small) | (damping[idx] > 1e8)
        converged[idx[done]] = True
    mu, jac = model(theta, everything, True)
    mu = np.maximum(mu, _FLOOR)
    jf = jac.reshape(k, p, -1)
    info = np.matmul(jf * (weight / mu).reshape(k, 1, -1), jf.transpose(0, 2, 1))
    cov = np.full((k, p, p), np.nan)
    ok = np.isfinite(info).all(axis=(1, 2)) & (np.linalg.cond(info) < 1e14)
    if ok.any():
        cov[ok] = np.linalg.inv(info[ok])
    return Fit(theta, cov, loglike, loglike0, converged)
